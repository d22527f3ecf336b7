//! The JSONL check of an upload, fed chunk by chunk as the bytes stream to storage: it counts
//! lines and parses each as JSON as soon as it is whole, so only the line in progress is held
//! in memory. Refusals name the line (1-based).

/// Why an upload's content is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line {line} is not valid JSON: {detail}")]
    NotJson { line: u64, detail: String },
    #[error("line {line} is empty; a JSONL file has one JSON object per line")]
    Empty { line: u64 },
    #[error("line {line} is longer than {limit} bytes")]
    TooLong { line: u64, limit: usize },
    #[error("the file has more than {limit} lines")]
    TooManyLines { limit: u64 },
    #[error("the file is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the file is empty")]
    NoLines,
}

/// Counts and checks the lines of a JSONL stream.
#[derive(Debug)]
pub struct LineCheck {
    max_bytes: u64,
    max_lines: u64,
    max_line: usize,
    bytes: u64,
    lines: u64,
    /// The line in progress (bytes since the last newline).
    partial: Vec<u8>,
}

impl LineCheck {
    pub fn new(max_bytes: u64, max_lines: u64, max_line: usize) -> Self {
        Self {
            max_bytes,
            max_lines,
            max_line,
            bytes: 0,
            lines: 0,
            partial: Vec::new(),
        }
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), LineError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.max_bytes {
            return Err(LineError::TooLarge {
                limit: self.max_bytes,
            });
        }
        let mut rest = chunk;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            self.push(&rest[..at])?;
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
            rest = &rest[at + 1..];
        }
        self.push(rest)
    }

    fn push(&mut self, part: &[u8]) -> Result<(), LineError> {
        if self.partial.len() + part.len() > self.max_line {
            return Err(LineError::TooLong {
                line: self.lines + 1,
                limit: self.max_line,
            });
        }
        self.partial.extend_from_slice(part);
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), LineError> {
        self.lines += 1;
        if self.lines > self.max_lines {
            return Err(LineError::TooManyLines {
                limit: self.max_lines,
            });
        }
        let line_no = self.lines;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Err(LineError::Empty { line: line_no });
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(|e| LineError::NotJson {
            line: line_no,
            detail: e.to_string(),
        })?;
        Ok(())
    }

    /// The end of the stream: the last line (when it has no newline) and the line count.
    pub fn finish(mut self) -> Result<u64, LineError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
        }
        if self.lines == 0 {
            return Err(LineError::NoLines);
        }
        Ok(self.lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[&str]) -> Result<u64, LineError> {
        let mut c = LineCheck::new(1_000, 3, 40);
        for chunk in chunks {
            c.feed(chunk.as_bytes())?;
        }
        c.finish()
    }

    #[test]
    fn lines_split_anywhere_between_chunks_are_counted_and_parsed() {
        assert_eq!(check(&["{\"a\"", ":1}\n{\"b\":", "2}\n"]), Ok(2));
        assert_eq!(check(&["{}\r\n[1]\n", "\"x\""]), Ok(3));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = check(&["{}\n", "{\"a\":}\n{}\n"]).unwrap_err();
        assert!(matches!(e, LineError::NotJson { line: 2, .. }), "{e:?}");
        assert_eq!(check(&["{}\n\n{}"]), Err(LineError::Empty { line: 2 }));
        assert_eq!(
            check(&["{}\n{"]).map_err(|e| e.to_string()).unwrap_err()[..20].to_string(),
            "line 2 is not valid "
        );
    }

    #[test]
    fn limits_are_enforced_as_the_bytes_come() {
        assert_eq!(
            check(&["{}\n{}\n{}\n{}\n"]),
            Err(LineError::TooManyLines { limit: 3 })
        );
        let long = format!("\"{}\"", "x".repeat(50));
        assert_eq!(
            check(&["{}\n", &long[..20], &long[20..]]),
            Err(LineError::TooLong { line: 2, limit: 40 })
        );
        let mut c = LineCheck::new(10, 100, 100);
        assert_eq!(c.feed(b"[1,2,3,4]\n"), Ok(()));
        assert_eq!(c.feed(b"1"), Err(LineError::TooLarge { limit: 10 }));
        assert_eq!(check(&[]), Err(LineError::NoLines));
    }
}
