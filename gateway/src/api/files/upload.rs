//! `POST /v1/files`: the multipart form read field by field; the file's bytes go to the object
//! store chunk by chunk while [`super::lines::LineCheck`] counts and parses its lines, so no
//! more than the line in progress is in memory. The row is written last, in the transaction
//! that checks the customer's quota; a refused upload's bytes are deleted.

use axum::extract::multipart::{Field, Multipart, MultipartRejection};
use axum::extract::State;
use axum::{Extension, Json};
use tollgate_metering::store::{FileRow, Store};

use super::lines::{LineCheck, LineError};
use super::wire::{FileObject, FileUpload};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::files::{unix_now, FileStorage, Upload};
use crate::AppState;

/// The largest file: 200 MB, as OpenAI's batch input files.
pub const MAX_FILE_BYTES: u64 = 200_000_000;
/// The most lines a file may have (OpenAI's batch limit).
pub const MAX_FILE_LINES: u64 = 50_000;
/// `expires_after.seconds` bounds: an hour to 30 days.
const EXPIRY_SECONDS: std::ops::RangeInclusive<i64> = 3_600..=2_592_000;
/// Without `expires_after`, a batch file expires after 30 days (as OpenAI's do).
const DEFAULT_EXPIRY_SECONDS: i64 = 2_592_000;

/// What the form said besides the file.
#[derive(Debug, Default)]
struct Form {
    purpose: Option<String>,
    anchor: Option<String>,
    seconds: Option<String>,
    /// The stored file: (filename, bytes, lines).
    file: Option<(String, u64, u64)>,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.into()),
    }
}

fn form_error(e: impl std::fmt::Display) -> ApiError {
    invalid(format!("cannot read the multipart form: {e}"), "file")
}

/// Uploads a file.
#[utoipa::path(post, operation_id = "create_file", path = "/v1/files", tag = "public",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let (store, files) = super::storage(&state)?;
    let mut multipart = multipart.map_err(form_error)?;
    let quota = i64::try_from(state.config.server.files_quota_bytes).unwrap_or(i64::MAX);
    let now = unix_now();
    let id = format!("file-{}", uuid::Uuid::now_v7().simple());
    let room = quota.saturating_sub(store.file_bytes_used(&caller.customer_id, now).await?);
    let mut form = Form::default();
    let limits = Limits {
        room,
        max_line: state.config.server.max_body_bytes,
    };
    let read = read_form(&mut multipart, &files, &id, limits, &mut form).await;
    let row = match read.and_then(|()| row_of(&id, &caller.customer_id, now, form)) {
        Ok(row) => row,
        Err(e) => {
            discard(&files, &id).await;
            return Err(e);
        }
    };
    match insert(&store, &row, quota).await {
        Ok(()) => Ok(Json(FileObject::from(&row))),
        Err(e) => {
            discard(&files, &id).await;
            Err(e)
        }
    }
}

async fn discard(files: &FileStorage, id: &str) {
    if let Err(e) = files.delete(id).await {
        tracing::warn!(file = %id, "a refused upload's bytes remain in the object store: {e}");
    }
}

/// Inserts the row unless the quota is exceeded by then.
async fn insert(store: &Store, row: &FileRow, quota: i64) -> Result<(), ApiError> {
    store
        .insert_file(row, quota)
        .await?
        .map_err(|over| over_quota(row.bytes, over.used, quota))
}

fn over_quota(bytes: i64, used: i64, quota: i64) -> ApiError {
    invalid(
        format!(
            "the file ({bytes} bytes) would exceed your storage quota of {quota} bytes ({used} bytes used); delete files first"
        ),
        "file",
    )
}

/// What one upload may hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Bytes left of the customer's quota.
    room: i64,
    /// The longest line: a request body larger than `max_body_bytes` is refused anyway.
    max_line: usize,
}

/// Reads every field; the file goes to storage as `id`.
async fn read_form(
    multipart: &mut Multipart,
    files: &FileStorage,
    id: &str,
    limits: Limits,
    form: &mut Form,
) -> Result<(), ApiError> {
    while let Some(field) = multipart.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                if form.file.is_some() {
                    return Err(invalid("the form has more than one file", "file"));
                }
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let (bytes, lines) = store_file(field, files.upload(id), limits).await?;
                form.file = Some((filename, bytes, lines));
            }
            "purpose" => form.purpose = Some(field.text().await.map_err(form_error)?),
            "expires_after[anchor]" => form.anchor = Some(field.text().await.map_err(form_error)?),
            "expires_after[seconds]" => {
                form.seconds = Some(field.text().await.map_err(form_error)?);
            }
            other => return Err(invalid(format!("unknown form field `{other}`"), "file")),
        }
    }
    Ok(())
}

/// Streams the file to storage, checking its lines; (bytes, lines).
async fn store_file(
    mut field: Field<'_>,
    mut upload: Upload,
    Limits { room, max_line }: Limits,
) -> Result<(u64, u64), ApiError> {
    let mut check = LineCheck::new(MAX_FILE_BYTES, MAX_FILE_LINES, max_line);
    let result = async {
        while let Some(chunk) = field.chunk().await.map_err(form_error)? {
            check.feed(&chunk).map_err(line_error)?;
            let bytes = i64::try_from(check.bytes()).unwrap_or(i64::MAX);
            if bytes > room {
                return Err(invalid(
                    format!("the file would exceed your storage quota: {room} bytes are left"),
                    "file",
                ));
            }
            upload
                .write(chunk)
                .await
                .map_err(|e| ApiError::Internal(format!("storing an upload: {e}")))?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        upload.abort().await;
        return Err(e);
    }
    let bytes = check.bytes();
    let lines = match check.finish() {
        Ok(lines) => lines,
        Err(e) => {
            upload.abort().await;
            return Err(line_error(e));
        }
    };
    upload
        .finish()
        .await
        .map_err(|e| ApiError::Internal(format!("storing an upload: {e}")))?;
    Ok((bytes, lines))
}

fn line_error(e: LineError) -> ApiError {
    match e {
        LineError::TooLarge { limit } => ApiError::PayloadTooLarge {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        },
        other => invalid(other.to_string(), "file"),
    }
}

/// The row for what the form said.
fn row_of(id: &str, customer_id: &str, now: i64, form: Form) -> Result<FileRow, ApiError> {
    match form.purpose.as_deref() {
        Some("batch") => {}
        Some(other) => {
            return Err(invalid(
                format!("purpose `{other}` is not supported; this server takes `batch` files"),
                "purpose",
            ))
        }
        None => return Err(invalid("the form has no `purpose` field", "purpose")),
    }
    let Some((filename, bytes, lines)) = form.file else {
        return Err(invalid("the form has no `file` field", "file"));
    };
    let expires_at = now
        + expiry(form.anchor.as_deref(), form.seconds.as_deref())?
            .unwrap_or(DEFAULT_EXPIRY_SECONDS);
    Ok(FileRow {
        id: id.into(),
        customer_id: customer_id.into(),
        filename,
        purpose: "batch".into(),
        bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        lines: i64::try_from(lines).unwrap_or(i64::MAX),
        created_at: now,
        expires_at: Some(expires_at),
    })
}

/// `expires_after`: seconds after the upload, or none.
fn expiry(anchor: Option<&str>, seconds: Option<&str>) -> Result<Option<i64>, ApiError> {
    match (anchor, seconds) {
        (None, None) => Ok(None),
        (Some("created_at"), Some(s)) => s
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|s| EXPIRY_SECONDS.contains(s))
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    format!(
                        "expires_after.seconds must be between {} and {}, not {s}",
                        EXPIRY_SECONDS.start(),
                        EXPIRY_SECONDS.end()
                    ),
                    "expires_after.seconds",
                )
            }),
        (Some(other), Some(_)) => Err(invalid(
            format!("expires_after.anchor must be `created_at`, not `{other}`"),
            "expires_after.anchor",
        )),
        _ => Err(invalid(
            "expires_after needs both anchor and seconds",
            "expires_after",
        )),
    }
}
