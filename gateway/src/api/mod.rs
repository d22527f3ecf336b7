//! The HTTP endpoints, one file per request path: chat and text completions (`completions`),
//! the Responses API (`responses/`), the Files API (`files/`), the Batch API's objects (`batches/`), models (`models`), health and metrics (`health`), the
//! customer's usage (`usage_api`), the operators' admin API (`admin`, `admin_tokens`,
//! `audit`), and the OpenAPI document of them all (`document`). Request bodies and their validation into a plan are in `openai`; every billed
//! request is admitted by `admission` and settled exactly once by the guard in `accounting`.
//! The router that mounts them, its middleware and the listener are in [`crate::server`]; the
//! key check in [`crate::auth`].

pub(crate) mod accounting;
pub mod admin;
pub mod admin_tokens;
pub(crate) mod admission;
pub(crate) mod audit;
pub(crate) mod batches;
pub(crate) mod completions;
pub(crate) mod document;
pub(crate) mod files;
pub(crate) mod health;
pub(crate) mod models;
pub mod openai;
pub(crate) mod responses;
pub(crate) mod usage_api;
