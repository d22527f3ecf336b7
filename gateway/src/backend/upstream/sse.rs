//! The `data` of server-sent events, decoded from an upstream's body as its bytes arrive: what
//! the completions stream reads (its `event`, `id` and `retry` fields are not used, so they are
//! skipped). It follows the HTML standard's parsing rules: lines end at LF, CR or CR LF; a
//! line starting with `:` is a comment; `data` lines are joined with LF; an empty line ends
//! an event, which is dispatched when it has data; one leading space of a value and a leading
//! byte order mark are dropped; an event not ended by an empty line when the body ends is not
//! dispatched.
//!
//! It scans each byte once (for line ends with `memchr`, many bytes at a time) and copies only
//! the data: the general-purpose parser it replaced took a measured 7% of the gateway's
//! instructions per proxied request.

use std::fmt;

/// Bytes of the body that are not yet a whole line, and the event being gathered.
#[derive(Default)]
pub(super) struct Decoder {
    buf: Vec<u8>,
    /// Where the first line not yet read starts in `buf`.
    start: usize,
    /// The data lines of the event being gathered, each followed by LF.
    data: String,
    /// The body's first bytes are read (its byte order mark, if any, is dropped).
    begun: bool,
}

/// A line that is not UTF-8.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NotUtf8;

impl fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event line is not UTF-8")
    }
}

const BOM: &[u8] = "\u{feff}".as_bytes();

impl Decoder {
    /// More of the body.
    pub(super) fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        if !self.begun {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                // Too short to tell yet.
                return;
            }
            self.begun = true;
            if self.buf.starts_with(BOM) {
                self.start = BOM.len();
            }
        }
    }

    /// The next complete event's data, or `None` until more of the body is fed.
    pub(super) fn next_data(&mut self) -> Option<Result<String, NotUtf8>> {
        if !self.begun {
            return None;
        }
        loop {
            let rest = &self.buf[self.start..];
            let end = memchr::memchr2(b'\n', b'\r', rest)?;
            let after = match rest[end] {
                // A CR at the end of what arrived may be the first half of CR LF.
                b'\r' if end + 1 == rest.len() => return None,
                b'\r' if rest[end + 1] == b'\n' => end + 2,
                _ => end + 1,
            };
            let line = &rest[..end];
            let line = match std::str::from_utf8(line) {
                Ok(l) => l,
                Err(_) => return Some(Err(NotUtf8)),
            };
            if line.is_empty() {
                self.start += after;
                if self.data.is_empty() {
                    continue;
                }
                let mut data = std::mem::take(&mut self.data);
                data.pop();
                return Some(Ok(data));
            }
            if !line.starts_with(':') {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                if field == "data" {
                    self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    self.data.push('\n');
                }
            }
            self.start += after;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event's data when `body` arrives in pieces of `piece` bytes.
    fn events(body: &[u8], piece: usize) -> Vec<Result<String, NotUtf8>> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for part in body.chunks(piece) {
            d.feed(part);
            while let Some(e) = d.next_data() {
                let failed = e.is_err();
                out.push(e);
                if failed {
                    return out;
                }
            }
        }
        out
    }

    fn ok(v: &[&str]) -> Vec<Result<String, NotUtf8>> {
        v.iter().map(|s| Ok(s.to_string())).collect()
    }

    #[test]
    fn events_whatever_the_pieces() {
        let body =
            "\u{feff}: a comment\r\nevent: x\ndata: {\"a\":1}\n\ndata:two\rdata:  lines\r\r\n\
                    id: 7\nretry: 10\n\ndata\n\ndata: [DONE]\n\ndata: never ended\n";
        for piece in 1..=body.len() {
            assert_eq!(
                events(body.as_bytes(), piece),
                ok(&["{\"a\":1}", "two\n lines", "", "[DONE]"]),
                "pieces of {piece} bytes"
            );
        }
    }

    #[test]
    fn an_event_without_data_is_not_dispatched() {
        assert_eq!(events(b"event: ping\n\n: keep-alive\n\n\n", 4), ok(&[]));
    }

    #[test]
    fn a_line_that_is_not_utf8_is_an_error() {
        assert_eq!(
            events(b"data: ok\n\ndata: \xff\xfe\n\n", 3),
            vec![Ok("ok".to_string()), Err(NotUtf8)]
        );
        // A character split between pieces is whole once both arrived.
        assert_eq!(events("data: é\n\n".as_bytes(), 1), ok(&["é"]));
    }
}
