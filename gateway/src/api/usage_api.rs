//! The customer's own usage in OpenAI's Usage and Costs API shapes:
//! `GET /v1/organization/usage/completions` and `GET /v1/organization/costs`, always scoped to
//! the calling key's customer.

use axum::extract::{Query, RawQuery, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::query;
use crate::error::ApiError;
use crate::AppState;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::usd_f64;
use tollgate_metering::store::{now_micros, GroupBy, UsageFilter, UsageRow};

const MICROS: i64 = 1_000_000;

/// One group of a usage bucket (`organization.usage.completions.result`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionsUsageResult {
    #[schema(value_type = String)]
    pub object: &'static str,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub input_cached_tokens: i64,
    pub input_audio_tokens: i64,
    pub output_audio_tokens: i64,
    pub num_model_requests: i64,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub api_key_id: Option<String>,
    pub model: Option<String>,
    pub batch: Option<bool>,
    /// With `group_by=service_tier`: the tier the requests were served at.
    #[schema(value_type = Option<String>)]
    pub service_tier: Option<ServiceTier>,
}

/// A page of time buckets of `$result` rows, in OpenAI's shape: the type of the page, the
/// type of its buckets (each API names its own), and how the page is made from the window's
/// buckets (`buckets`).
macro_rules! bucket_page {
    ($(#[$doc:meta])* $page:ident of $bucket:ident of $result:ty) => {
        #[derive(Debug, Serialize, ToSchema)]
        pub struct $bucket {
            #[schema(value_type = String, pattern = "^bucket$")]
            pub object: &'static str,
            pub start_time: i64,
            pub end_time: i64,
            pub results: Vec<$result>,
        }

        $(#[$doc])*
        #[derive(Debug, Serialize, ToSchema)]
        pub struct $page {
            #[schema(value_type = String, pattern = "^page$")]
            pub object: &'static str,
            pub data: Vec<$bucket>,
            pub has_more: bool,
            #[schema(required)]
            pub next_page: Option<String>,
        }

        impl $page {
            fn new(buckets: Vec<(i64, i64, Vec<$result>)>, w: &Window) -> Self {
                let data = buckets
                    .into_iter()
                    .map(|(start_time, end_time, results)| $bucket {
                        object: "bucket",
                        start_time,
                        end_time,
                        results,
                    })
                    .collect();
                Self {
                    object: "page",
                    data,
                    has_more: w.next_page.is_some(),
                    next_page: w.next_page.map(|n| n.to_string()),
                }
            }
        }
    };
}

bucket_page!(
    /// `GET /v1/organization/usage/completions`.
    UsageResponse of CompletionsUsageBucket of CompletionsUsageResult
);

#[derive(Debug, Serialize, ToSchema)]
pub struct CostAmount {
    pub value: f64,
    #[schema(value_type = String)]
    pub currency: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CostsResult {
    #[schema(value_type = String)]
    pub object: &'static str,
    pub amount: CostAmount,
    pub line_item: Option<String>,
    pub project_id: Option<String>,
}

bucket_page!(
    /// `GET /v1/organization/costs`.
    CostsResponse of CostsBucket of CostsResult
);

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    start_time: Option<i64>,
    end_time: Option<i64>,
    bucket_width: Option<String>,
    /// Comma-separated (`group_by=model,api_key_id`).
    group_by: Option<String>,
    limit: Option<i64>,
    page: Option<String>,
}

/// The parameters both routes understand. OpenAI's filters that Tollgate does not implement
/// (`project_ids`, `user_ids`, `api_key_ids`, `models`, ...) are refused by name rather than
/// ignored: an ignored filter would answer a different question than the one asked.
const KNOWN: &[&str] = &[
    "start_time",
    "end_time",
    "bucket_width",
    "group_by",
    "limit",
    "page",
];

/// Refuses the first query parameter that is not in `KNOWN`, naming it.
fn known_params(raw: Option<&str>) -> Result<(), ApiError> {
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or(pair);
        if !KNOWN.contains(&name) {
            return Err(invalid(
                name,
                format!(
                    "query parameter `{name}` is not supported; use {}",
                    KNOWN.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some(param.to_string()),
    }
}

/// Bucket width in seconds, and (default, max) bucket counts per page, as OpenAI documents them.
fn width(name: &str, costs: bool) -> Result<(i64, i64, i64), ApiError> {
    match name {
        "1d" => Ok((86_400, 7, if costs { 180 } else { 31 })),
        "1h" if !costs => Ok((3_600, 24, 168)),
        "1m" if !costs => Ok((60, 60, 1_440)),
        other => Err(invalid(
            "bucket_width",
            format!(
                "bucket_width `{other}` is not supported; use {}",
                if costs { "1d" } else { "1m, 1h or 1d" }
            ),
        )),
    }
}

/// The page of buckets `[first, last)` (Unix seconds) this request covers, and the next page.
struct Window {
    start: i64,
    end: i64,
    width: i64,
    next_page: Option<i64>,
}

fn window(
    start_time: Option<i64>,
    end_time: Option<i64>,
    width_secs: i64,
    limits: (i64, i64),
    limit: Option<i64>,
    page: Option<&str>,
) -> Result<Window, ApiError> {
    let start = start_time.ok_or_else(|| {
        invalid(
            "start_time",
            "`start_time` (Unix seconds, inclusive) is required".into(),
        )
    })?;
    if start < 0 {
        return Err(invalid(
            "start_time",
            format!("start_time {start} is negative"),
        ));
    }
    let end = end_time.unwrap_or(now_micros() / MICROS + 1);
    if end <= start {
        return Err(invalid(
            "end_time",
            format!("end_time {end} is not after start_time {start}"),
        ));
    }
    let (default, max) = limits;
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("limit {limit} must be between 1 and {max}"),
        ));
    }
    // The page token is the start of the page's first bucket, on the grid of `start`.
    let first = match page {
        None | Some("") => start,
        Some(p) => p
            .parse::<i64>()
            .ok()
            .filter(|p| *p >= start && *p < end && (p - start) % width_secs == 0)
            .ok_or_else(|| invalid("page", format!("`{p}` is not a page token of this query")))?,
    };
    let page_end = first.saturating_add(limit.saturating_mul(width_secs));
    Ok(Window {
        start: first,
        end: page_end.min(end),
        width: width_secs,
        next_page: (page_end < end).then_some(page_end),
    })
}

fn group_by(text: Option<&str>, allowed: &[&str]) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for g in text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if !allowed.contains(&g) {
            return Err(invalid(
                "group_by",
                format!("cannot group by `{g}`; use {}", allowed.join(" or ")),
            ));
        }
        out.push(g.to_string());
    }
    Ok(out)
}

/// Rows grouped into the window's buckets, every bucket present (empty ones too).
async fn bucketed(
    state: &AppState,
    caller: &Caller,
    w: &Window,
    groups: &[GroupBy],
) -> Result<Vec<(i64, Vec<UsageRow>)>, ApiError> {
    let store = state.store.as_ref().ok_or_else(|| {
        ApiError::Unavailable("usage is not recorded: this gateway runs without a database".into())
    })?;
    let filter = UsageFilter {
        start: w.start * MICROS,
        end: w.end * MICROS,
        customer_id: Some(caller.customer_id.clone()),
        model: None,
        tag: None,
    };
    let rows = store
        .aggregate(&filter, groups, Some((w.start * MICROS, w.width * MICROS)))
        .await?;
    let mut buckets = Vec::new();
    let mut t = w.start;
    while t < w.end {
        let here: Vec<UsageRow> = rows
            .iter()
            .filter(|r| r.bucket_start == Some(t * MICROS))
            .cloned()
            .collect();
        buckets.push((t, here));
        t += w.width;
    }
    Ok(buckets)
}

/// The window a query asks for: its bucket width (`1d` by default) and page.
fn query_window(q: &UsageQuery, costs: bool) -> Result<Window, ApiError> {
    let (secs, default, max) = width(q.bucket_width.as_deref().unwrap_or("1d"), costs)?;
    window(
        q.start_time,
        q.end_time,
        secs,
        (default, max),
        q.limit,
        q.page.as_deref(),
    )
}

/// The window's buckets in time order: each bucket's start and end (Unix seconds) and its rows,
/// rendered by `result`.
async fn buckets<R>(
    state: &AppState,
    caller: &Caller,
    w: &Window,
    groups: &[GroupBy],
    result: impl Fn(&UsageRow) -> R,
) -> Result<Vec<(i64, i64, Vec<R>)>, ApiError> {
    Ok(bucketed(state, caller, w, groups)
        .await?
        .into_iter()
        .map(|(t, rows)| (t, t + w.width, rows.iter().map(&result).collect()))
        .collect())
}

/// The caller's customer's token usage in time buckets (OpenAI's Usage API).
#[utoipa::path(get, path = "/v1/organization/usage/completions", tag = "public",
    params(
        ("start_time" = i64, Query, minimum = 0, description = "Unix seconds, inclusive"),
        ("end_time" = Option<i64>, Query, minimum = 0, description = "Unix seconds, exclusive"),
        ("bucket_width" = Option<String>, Query, pattern = "^(1m|1h|1d)$"),
        ("group_by" = Option<String>, Query, description = "Comma-separated: `model`, `api_key_id`, `service_tier`"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Buckets per page"),
        ("page" = Option<String>, Query, description = "`next_page` of the previous page"),
    ),
    responses((status = 200, body = UsageResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn completions_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageResponse>, ApiError> {
    known_params(raw.as_deref())?;
    let q = query(q)?;
    let w = query_window(&q, false)?;
    let groups: Vec<GroupBy> = group_by(
        q.group_by.as_deref(),
        &["model", "api_key_id", "service_tier"],
    )?
    .iter()
    .map(|g| match g.as_str() {
        "model" => GroupBy::Model,
        "service_tier" => GroupBy::ServiceTier,
        _ => GroupBy::Key,
    })
    .collect();
    let data = buckets(&state, &caller, &w, &groups, |r| CompletionsUsageResult {
        object: "organization.usage.completions.result",
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        input_cached_tokens: r.cached_input_tokens,
        input_audio_tokens: 0,
        output_audio_tokens: 0,
        num_model_requests: r.requests,
        project_id: None,
        user_id: None,
        api_key_id: r.key_id.clone(),
        model: r.model.clone(),
        batch: None,
        service_tier: r.service_tier,
    })
    .await?;
    Ok(Json(UsageResponse::new(data, &w)))
}

/// The caller's customer's costs in daily buckets (OpenAI's Costs API).
#[utoipa::path(get, path = "/v1/organization/costs", tag = "public",
    params(
        ("start_time" = i64, Query, minimum = 0, description = "Unix seconds, inclusive"),
        ("end_time" = Option<i64>, Query, minimum = 0, description = "Unix seconds, exclusive"),
        ("bucket_width" = Option<String>, Query, pattern = "^1d$"),
        ("group_by" = Option<String>, Query, description = "`line_item`"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Buckets per page"),
        ("page" = Option<String>, Query, description = "`next_page` of the previous page"),
    ),
    responses((status = 200, body = CostsResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn costs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CostsResponse>, ApiError> {
    known_params(raw.as_deref())?;
    let q = query(q)?;
    let w = query_window(&q, true)?;
    // Line items are models (with their prices, one price per model at a time).
    let names = group_by(q.group_by.as_deref(), &["line_item", "project_id"])?;
    let groups: &[GroupBy] = if names.iter().any(|g| g == "line_item") {
        &[GroupBy::Model]
    } else {
        &[]
    };
    let data = buckets(&state, &caller, &w, groups, |r| CostsResult {
        object: "organization.costs.result",
        amount: CostAmount {
            value: usd_f64(r.cost_nano_usd),
            currency: "usd",
        },
        line_item: r.model.clone(),
        project_id: None,
    })
    .await?;
    Ok(Json(CostsResponse::new(data, &w)))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_page_on_the_start_grid() {
        let w = window(Some(0), Some(10 * 86_400), 86_400, (7, 31), None, None).unwrap();
        assert_eq!(
            (w.start, w.end, w.next_page),
            (0, 7 * 86_400, Some(7 * 86_400))
        );
        let w = window(
            Some(0),
            Some(10 * 86_400),
            86_400,
            (7, 31),
            None,
            Some("604800"),
        )
        .unwrap();
        assert_eq!(
            (w.start, w.end, w.next_page),
            (7 * 86_400, 10 * 86_400, None)
        );
        assert!(window(Some(0), Some(10), 86_400, (7, 31), None, Some("5")).is_err());
        assert!(window(None, Some(10), 86_400, (7, 31), None, None).is_err());
        assert!(window(Some(0), Some(10), 86_400, (7, 31), Some(32), None).is_err());
    }

    #[test]
    fn unknown_parameters_are_refused_by_name() {
        assert!(known_params(None).is_ok());
        assert!(known_params(Some("start_time=1&group_by=model,api_key_id")).is_ok());
        for (raw, param) in [
            ("start_time=1&project_ids=x", "project_ids"),
            ("api_key_ids=k", "api_key_ids"),
            ("user_ids", "user_ids"),
        ] {
            match known_params(Some(raw)) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => assert_eq!(p, param),
                other => panic!("{raw}: {other:?}"),
            }
        }
    }
}
