//! The Files API's wire shapes (OpenAI's): the file object, a page of them, a deletion, and
//! the upload form as /openapi.json describes it.

use serde::Serialize;
use tollgate_metering::store::FileRow;
use utoipa::ToSchema;

/// A file (`object: "file"`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileObject {
    /// `file-…`
    pub id: String,
    #[schema(value_type = String, pattern = "^file$")]
    pub object: &'static str,
    /// Size in bytes.
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; null never expires.
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    /// `processed`: every line was checked as it was uploaded.
    #[schema(value_type = String, pattern = "^processed$")]
    pub status: &'static str,
}

impl From<&FileRow> for FileObject {
    fn from(r: &FileRow) -> Self {
        Self {
            id: r.id.clone(),
            object: "file",
            bytes: r.bytes,
            created_at: r.created_at,
            expires_at: r.expires_at,
            filename: r.filename.clone(),
            purpose: r.purpose.clone(),
            status: "processed",
        }
    }
}

/// A page of files.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A deleted file.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedFile {
    pub id: String,
    #[schema(value_type = String, pattern = "^file$")]
    pub object: &'static str,
    pub deleted: bool,
}

/// The upload's multipart form (`multipart/form-data`), as the handler reads it field by field.
#[derive(Debug, ToSchema)]
#[expect(
    dead_code,
    reason = "describes the multipart form the upload handler reads"
)]
pub struct FileUpload {
    /// The JSONL file: one request per line, at most 200 MB and 50,000 lines.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// `batch`
    #[schema(pattern = "^batch$")]
    purpose: String,
    /// `created_at`: the expiry counts from the upload.
    #[schema(rename = "expires_after[anchor]", pattern = "^created_at$")]
    expires_after_anchor: Option<String>,
    /// Seconds after the anchor, 3600 to 2592000 (30 days).
    #[schema(rename = "expires_after[seconds]", minimum = 3600, maximum = 2_592_000)]
    expires_after_seconds: Option<i64>,
}
