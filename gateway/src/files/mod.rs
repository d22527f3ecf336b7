//! Where the Files API keeps file bytes: an object store (the `object_store` crate), a local
//! directory by default or an S3-compatible bucket (`--files-url s3://bucket/prefix`, the
//! standard `AWS_*` variables) when several replicas share the files. One object per file,
//! named by the file's id. Also the sweep that deletes expired files, bytes then row. What a
//! file is (owner, size, expiry) is the ledger database's `files` table (metering's store).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tollgate_metering::store::Store;

/// The object store holding the files' bytes.
#[derive(Clone)]
pub struct FileStorage {
    objects: Arc<dyn ObjectStore>,
    /// For logs: where the bytes are.
    place: Arc<str>,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage")
            .field("place", &self.place)
            .finish()
    }
}

/// A file being written: its bytes go to the store as they come, and nothing is visible
/// under its name until [`Upload::finish`].
pub struct Upload {
    writer: BufWriter,
}

impl Upload {
    /// Appends a chunk.
    pub async fn write(&mut self, chunk: Bytes) -> object_store::Result<()> {
        self.writer.put(chunk).await
    }

    /// Completes the object.
    pub async fn finish(mut self) -> std::io::Result<()> {
        self.writer.shutdown().await
    }

    /// Drops what was written.
    pub async fn abort(mut self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!("cannot abort a refused upload: {e}");
        }
    }
}

impl FileStorage {
    /// A local directory (created when missing).
    pub fn local(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the files directory {}", dir.display()))?;
        let objects = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("cannot use the files directory {}", dir.display()))?;
        Ok(Self {
            objects: Arc::new(objects),
            place: dir.display().to_string().into(),
        })
    }

    /// `s3://bucket/prefix` (with `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ... from the
    /// environment), or a local directory (`file:///dir` or a plain path).
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "--files-url {url}: no bucket");
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .with_context(|| format!("--files-url {url}"))?;
            let prefix = prefix.trim_matches('/');
            let objects: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            };
            return Ok(Self {
                objects,
                place: url.into(),
            });
        }
        Self::local(Path::new(url.strip_prefix("file://").unwrap_or(url)))
    }

    fn path(id: &str) -> ObjectPath {
        ObjectPath::from(id)
    }

    /// Starts writing file `id`.
    pub fn upload(&self, id: &str) -> Upload {
        Upload {
            writer: BufWriter::new(self.objects.clone(), Self::path(id)),
        }
    }

    /// File `id`'s bytes, as a stream.
    pub async fn read(
        &self,
        id: &str,
    ) -> object_store::Result<BoxStream<'static, object_store::Result<Bytes>>> {
        Ok(self.objects.get(&Self::path(id)).await?.into_stream())
    }

    /// Deletes file `id`'s bytes (none there is not an error).
    pub async fn delete(&self, id: &str) -> object_store::Result<()> {
        match self.objects.delete(&Self::path(id)).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Deletes expired files, bytes then row, every `every` until `stop`.
    pub async fn sweep(self, store: Store, every: Duration, stop: CancellationToken) {
        loop {
            if let Err(e) = self.sweep_once(&store).await {
                tracing::warn!(place = %self.place, "file expiry sweep: {e}");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One pass of the sweep: every file expired now.
    pub async fn sweep_once(&self, store: &Store) -> anyhow::Result<usize> {
        let mut swept = 0;
        loop {
            let expired = store.expired_files(unix_now(), 100).await?;
            if expired.is_empty() {
                return Ok(swept);
            }
            for id in expired {
                self.delete(&id).await?;
                store.forget_file(&id).await?;
                swept += 1;
            }
        }
    }
}

/// Unix seconds now (the Files API's unit).
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A stream of a file's bytes, for a response body.
pub fn body(stream: BoxStream<'static, object_store::Result<Bytes>>) -> axum::body::Body {
    axum::body::Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other)))
}

#[cfg(test)]
mod tests {
    use tollgate_metering::store::FileRow;

    use super::*;

    fn row(id: &str, expires_at: i64) -> FileRow {
        FileRow {
            id: id.into(),
            customer_id: "acme".into(),
            filename: "f.jsonl".into(),
            purpose: "batch".into(),
            bytes: 3,
            lines: 1,
            created_at: 0,
            expires_at: Some(expires_at),
        }
    }

    async fn put(files: &FileStorage, id: &str) {
        let mut upload = files.upload(id);
        upload.write(Bytes::from_static(b"{}\n")).await.unwrap();
        upload.finish().await.unwrap();
    }

    #[tokio::test]
    async fn the_sweep_deletes_expired_files_bytes_and_rows_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(dir.path().join("ledger.db").to_str().unwrap())
            .await
            .unwrap();
        let files = FileStorage::local(&dir.path().join("files")).unwrap();
        let later = unix_now() + 3_600;
        for (id, expires_at) in [("file-old", 1), ("file-new", later)] {
            put(&files, id).await;
            store
                .insert_file(&row(id, expires_at), 1_000)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(files.sweep_once(&store).await.unwrap(), 1);
        assert!(!dir.path().join("files/file-old").exists());
        assert!(dir.path().join("files/file-new").exists());
        assert_eq!(
            store.expired_files(later, 10).await.unwrap(),
            vec!["file-new"]
        );
        assert_eq!(files.sweep_once(&store).await.unwrap(), 0);
        let mut content = files.read("file-new").await.unwrap();
        assert_eq!(
            content.next().await.unwrap().unwrap(),
            Bytes::from_static(b"{}\n")
        );
    }
}
