//! The work a customer left to run: its Batch API batches (status, progress as OpenAI's
//! `request_counts`, lines, cost of the lines' records so far) and its background responses
//! (status, output tokens, cost once billed), newest first, on the customer's page. The rows
//! are metering's console queries.

use maud::{html, Markup};
use tollgate_metering::store::Store;

use super::pages::{time, usd};
use crate::error::ApiError;

/// How many of each the page lists.
const SHOWN: u32 = 50;

/// The customer's batches and background responses.
pub(super) async fn section(store: &Store, customer_id: &str) -> Result<Markup, ApiError> {
    let batches = store.batches_of(customer_id, SHOWN).await?;
    let responses = store.background_of(customer_id, SHOWN).await?;
    let seconds = |s: i64| time(s.saturating_mul(1_000_000));
    Ok(html! {
        h2 { "Batches" }
        @if batches.is_empty() { p { "None." } } @else {
            table #batches {
                thead { tr { th { "Id" } th { "Endpoint" } th { "Status" } th { "Progress" } th { "Lines" } th { "Cost so far" } th { "Created" } } }
                tbody {
                    @for b in &batches {
                        tr {
                            td { (b.id) }
                            td { (b.endpoint) }
                            td.status { (b.status.as_str()) }
                            td.progress { (b.completed) " completed, " (b.failed) " failed" }
                            td.lines { (b.total) }
                            td.cost { (usd(b.cost_nano_usd)) }
                            td { (seconds(b.created_at)) }
                        }
                    }
                }
            }
        }
        h2 { "Background responses" }
        @if responses.is_empty() { p { "None." } } @else {
            table #background-responses {
                thead { tr { th { "Id" } th { "Model" } th { "Status" } th { "Output tokens" } th { "Cost" } th { "Created" } } }
                tbody {
                    @for r in &responses {
                        tr {
                            td { (r.id) }
                            td { (r.model) }
                            td.status { (r.status.as_str()) }
                            td { (r.output_tokens) }
                            td.cost { (usd(r.cost_nano_usd)) }
                            td { (seconds(r.created_at)) }
                        }
                    }
                }
            }
        }
    })
}
