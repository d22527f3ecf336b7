//! Where the bytes of a GGUF file's tensors come from: a file mapped one tensor at a time, or
//! any reader, one read at a time. It does not interpret the bytes (`gguf.rs` does).

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;

use crate::{Error, Result};

/// A tensor's bytes: mapped from the file (unmapped when dropped, so the pages leave the
/// process as soon as the weights are converted) or read into memory.
pub(super) enum TensorBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for TensorBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// Where the bytes of a GGUF file's tensors come from; shared by the threads that convert
/// the blocks.
pub(super) trait TensorSource: Sync {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes>;
    /// Fills `buf` from the file at `offset` (inside a tensor's checked range).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn size(&self) -> Result<u64>;
}

/// Any reader: each tensor read into memory, one read at a time.
pub(super) struct ReadSource<'a, R>(pub(super) std::sync::Mutex<&'a mut R>);

impl<'a, R: Read + Seek> ReadSource<'a, R> {
    fn reader(&self) -> std::sync::MutexGuard<'_, &'a mut R> {
        // A panic while reading leaves only a seek position behind: every read seeks first.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<R: Read + Seek + Send> TensorSource for ReadSource<'_, R> {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights("a tensor is larger than memory".into()))?;
        let mut buf = vec![0u8; len];
        let mut reader = self.reader();
        reader
            .seek(SeekFrom::Start(range.start))
            .and_then(|_| reader.read_exact(&mut buf))
            .map_err(|e| Error::Weights(format!("reading tensor bytes {range:?}: {e}")))?;
        Ok(TensorBytes::Owned(buf))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut reader = self.reader();
        reader
            .seek(SeekFrom::Start(offset))
            .and_then(|_| reader.read_exact(buf))
            .map_err(|e| Error::Weights(format!("reading tensor bytes at {offset}: {e}")))
    }

    fn size(&self) -> Result<u64> {
        self.reader()
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::Weights(format!("cannot size the GGUF file: {e}")))
    }
}

/// A file: each tensor mapped on its own, read-only.
pub(super) struct MapSource<'a>(pub(super) &'a std::fs::File);

impl TensorSource for MapSource<'_> {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights("a tensor is larger than memory".into()))?;
        if len == 0 {
            return Ok(TensorBytes::Owned(Vec::new()));
        }
        // SAFETY: a read-only private mapping of a range checked to be inside the file. The
        // file must not be truncated while the model loads (as for every mapped model file);
        // the mapping lives only until this tensor is converted.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(range.start)
                .len(len)
                .populate()
                .map(self.0)
        }
        .map_err(|e| Error::Weights(format!("cannot map tensor bytes {range:?}: {e}")))?;
        Ok(TensorBytes::Mapped(map))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.0
            .read_exact_at(buf, offset)
            .map_err(|e| Error::Weights(format!("reading tensor bytes at {offset}: {e}")))
    }

    fn size(&self) -> Result<u64> {
        Ok(self
            .0
            .metadata()
            .map_err(|e| Error::Weights(format!("cannot size the GGUF file: {e}")))?
            .len())
    }
}
