//! GGUF files as untrusted input: a model file comes from the internet, and its header's counts,
//! lengths, dimensions and offsets drive what the loader allocates and reads.
//!
//! Before candle parses a header, [`read_content`] walks it once, checking every length against
//! the bytes left in the file and adding up what the parsed metadata will occupy in memory
//! (one `Value` per array element, plus string bytes): a header that would take more than the
//! file's own size plus [`METADATA_ALLOWANCE`] is refused, so a 1 MB file cannot make the
//! loader allocate gigabytes. After parsing, every tensor's byte range is checked: its size
//! computed without overflow, inside the file, aligned, and not overlapping another tensor.
//! Each failure is an error naming the value at fault; nothing here panics.
//!
//! It does not read tensor data or check tensors against a model's shape (`model::load` does).

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};

/// Memory the parsed metadata may take beyond the file's own size.
pub const METADATA_ALLOWANCE: u64 = 64 << 20;
/// Nesting of arrays in arrays allowed in metadata.
const MAX_DEPTH: usize = 8;
/// Tensor data must start at a multiple of this (GGUF aligns to 32 by default; candle views
/// the bytes as blocks and f32 values, which must be aligned).
const TENSOR_ALIGN: u64 = 8;

/// A failed check, in words.
pub type Problem = String;

/// Reads a GGUF header from `reader` (at its start), refusing one whose counts, lengths or
/// metadata size the file cannot back, and then any tensor range that is out of the file,
/// misaligned or overlapping. Leaves the reader at an unspecified position.
pub fn read_content<R: Read + Seek>(reader: &mut R) -> Result<Content, Problem> {
    let size = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut buffered = Positioned {
        inner: BufReader::with_capacity(1 << 16, &mut *reader),
        pos: 0,
    };
    Scan {
        r: &mut buffered,
        pos: 0,
        size,
        cost: 0,
        budget: size.saturating_add(METADATA_ALLOWANCE),
    }
    .header()?;
    buffered
        .seek(SeekFrom::Start(0))
        .map_err(|e| e.to_string())?;
    let content = Content::read(&mut buffered).map_err(|e| e.to_string())?;
    check_tensors(&content, size)?;
    Ok(content)
}

/// The byte range of `info`'s data in a file of `file_size` bytes whose tensor data starts at
/// `data_offset`.
pub fn tensor_range(
    name: &str,
    info: &TensorInfo,
    data_offset: u64,
    file_size: u64,
) -> Result<Range<u64>, Problem> {
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| format!("tensor `{name}` has dimensions {dims:?}, too many elements"))?;
    let block = info.ggml_dtype.block_size() as u64;
    if !elems.is_multiple_of(block) {
        return Err(format!(
            "tensor `{name}` has {elems} elements, not a multiple of its {:?} block of {block}",
            info.ggml_dtype
        ));
    }
    let bytes = (elems / block)
        .checked_mul(info.ggml_dtype.type_size() as u64)
        .ok_or_else(|| format!("tensor `{name}` is too large ({dims:?})"))?;
    let start = data_offset
        .checked_add(info.offset)
        .ok_or_else(|| format!("tensor `{name}` has offset {} past any file", info.offset))?;
    let end = start
        .checked_add(bytes)
        .filter(|&end| end <= file_size)
        .ok_or_else(|| {
            format!(
                "tensor `{name}` needs bytes {start}..{} but the file has {file_size}",
                start.saturating_add(bytes)
            )
        })?;
    if !start.is_multiple_of(TENSOR_ALIGN) {
        return Err(format!(
            "tensor `{name}` starts at byte {start}, not aligned to {TENSOR_ALIGN}"
        ));
    }
    Ok(start..end)
}

/// Every tensor's range is valid and no two overlap.
pub fn check_tensors(content: &Content, file_size: u64) -> Result<(), Problem> {
    let mut ranges = content
        .tensor_infos
        .iter()
        .map(|(name, info)| {
            tensor_range(name, info, content.tensor_data_offset, file_size).map(|r| (r, name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ranges.sort_by_key(|(r, _)| (r.start, r.end));
    for pair in ranges.windows(2) {
        let ((a, a_name), (b, b_name)) = (&pair[0], &pair[1]);
        if b.start < a.end && !b.is_empty() && !a.is_empty() {
            return Err(format!(
                "tensors `{a_name}` (bytes {a:?}) and `{b_name}` (bytes {b:?}) overlap"
            ));
        }
    }
    Ok(())
}

/// A buffered reader that knows its position: candle's parser asks for it before every
/// string (a system call through `BufReader`: 400,000 `lseek`s, a fifth of a second, for a
/// 128k-token vocabulary), and relative seeks stay inside the buffer.
struct Positioned<R> {
    inner: BufReader<R>,
    pos: u64,
}

impl<R: Read> Read for Positioned<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Positioned<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        match to {
            SeekFrom::Current(0) => {}
            SeekFrom::Current(step) => self.seek_relative(step)?,
            other => self.pos = self.inner.seek(other)?,
        }
        Ok(self.pos)
    }

    fn seek_relative(&mut self, step: i64) -> std::io::Result<()> {
        self.inner.seek_relative(step)?;
        self.pos = self.pos.checked_add_signed(step).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(())
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

/// One pass over a header, counting the memory its parse will take.
struct Scan<'a, R> {
    r: &'a mut R,
    pos: u64,
    size: u64,
    cost: u64,
    budget: u64,
}

impl<R: Read + Seek> Scan<'_, R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Problem> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("the file ends inside {what} (at byte {})", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Problem> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Problem> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Skips `n` bytes that must be in the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), Problem> {
        if n > self.size.saturating_sub(self.pos) {
            return Err(format!(
                "{what} needs {n} bytes at byte {} but the file has {}",
                self.pos, self.size
            ));
        }
        let step = i64::try_from(n).map_err(|_| format!("{what} is too long"))?;
        self.r.seek_relative(step).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(())
    }

    /// Adds `bytes` of parsed memory.
    fn charge(&mut self, bytes: u64, what: &str) -> Result<(), Problem> {
        self.cost = self.cost.saturating_add(bytes);
        if self.cost > self.budget {
            return Err(format!(
                "the metadata would take more than {} MB in memory (at {what}) for a file of {} MB",
                self.budget >> 20,
                self.size >> 20
            ));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<(), Problem> {
        let len = self.u64(what)?;
        self.skip(len, what)?;
        self.charge(len, what)
    }

    fn header(&mut self) -> Result<(), Problem> {
        let magic = self.u32("the magic number")?;
        if magic != 0x4655_4747 {
            return Err(format!("not a GGUF file (magic 0x{magic:08x})"));
        }
        let version = self.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 or 3)"));
        }
        let tensors = self.u64("the tensor count")?;
        let entries = self.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes, a tensor info 24.
        let left = self.size.saturating_sub(self.pos);
        if entries
            .saturating_mul(13)
            .saturating_add(tensors.saturating_mul(24))
            > left
        {
            return Err(format!(
                "the header declares {tensors} tensors and {entries} metadata entries, more than {left} bytes can hold"
            ));
        }
        let value = std::mem::size_of::<Value>() as u64;
        for i in 0..entries {
            let what = format!("metadata entry {i}");
            self.string(&what)?;
            self.charge(value + 48, &what)?;
            let ty = self.u32(&what)?;
            self.value(ty, 0, &what)?;
        }
        for i in 0..tensors {
            let what = format!("tensor info {i}");
            self.string(&what)?;
            self.charge(128, &what)?;
            let dims = self.u32(&what)?;
            if dims > 4 {
                return Err(format!("{what} has {dims} dimensions (at most 4)"));
            }
            self.skip(u64::from(dims) * 8 + 4 + 8, &what)?;
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<(), Problem> {
        let value = std::mem::size_of::<Value>() as u64;
        match ty {
            0 | 1 | 7 => self.skip(1, what),
            2 | 3 => self.skip(2, what),
            4..=6 => self.skip(4, what),
            10..=12 => self.skip(8, what),
            8 => self.string(what),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem = self.u32(what)?;
                let len = self.u64(what)?;
                self.charge(len.saturating_mul(value), what)?;
                let fixed = match elem {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(size) => self.skip(len.saturating_mul(size), what),
                    None => {
                        // Strings take at least 8 bytes, arrays 12.
                        if len.saturating_mul(8) > self.size.saturating_sub(self.pos) {
                            return Err(format!(
                                "{what}: an array of {len} elements cannot fit in the file"
                            ));
                        }
                        (0..len).try_for_each(|_| self.value(elem, depth + 1, what))
                    }
                }
            }
            other => Err(format!("{what} has unknown value type {other}")),
        }
    }
}
