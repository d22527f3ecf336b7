//! The streaming parser: generated text → content and calls, as they are written.

use serde::Deserialize;
use serde_json::Value;

use super::{CallSyntax, CALL_CLOSE, CALL_OPEN};

/// A piece of generated output, in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Message content.
    Text(String),
    /// A call begins; its name is known.
    CallStart { name: String },
    /// More of the current call's arguments: the fragments of one call concatenate to its
    /// arguments object as the model wrote it.
    Arguments(String),
    /// The current call is complete, or the output ended inside it (`max_tokens`: the
    /// arguments are then incomplete, as OpenAI returns them with `finish_reason: "length"`).
    CallEnd,
}

#[derive(Deserialize)]
struct RawCall {
    name: String,
    #[serde(default, alias = "parameters")]
    arguments: Value,
}

/// Where the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Message content.
    Text,
    /// Inside a call, before its arguments: `{"name": "…", "arguments": `.
    Head,
    /// Inside the arguments value, streamed as it comes.
    Arguments(Scan),
    /// After the arguments: the call's closing brace (and `</tool_call>`).
    Tail,
    /// Inside a call that does not start as the grammar writes one (only possible without a
    /// constraint): held back until it ends, then parsed whole.
    Whole,
}

/// Splits streamed output into content and calls. Text that may be the start of a call marker
/// is held back until it is known; a call's id and name are returned as soon as the name is
/// complete, its arguments as they are written. A call that does not parse (possible only
/// unconstrained) is returned as text.
#[derive(Debug)]
pub struct CallParser {
    syntax: CallSyntax,
    pending: String,
    state: State,
    /// Nothing but whitespace was written so far (a Llama 3 call opens the answer).
    at_start: bool,
}

impl CallParser {
    pub fn new(syntax: CallSyntax) -> Self {
        Self {
            syntax,
            pending: String::new(),
            state: State::Text,
            at_start: true,
        }
    }

    /// Feeds generated text; returns what is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        match self.state {
            State::Text => self.text(out),
            State::Head => match head(&self.pending, self.syntax.arguments_key()) {
                Match::Done(name, len) => {
                    self.pending.drain(..len);
                    out.push(Piece::CallStart { name });
                    self.state = State::Arguments(Scan::default());
                    true
                }
                Match::More => false,
                Match::No => {
                    match self.syntax {
                        CallSyntax::Hermes => self.state = State::Whole,
                        // No marker to wait for: it was text that began with a brace.
                        CallSyntax::Llama3Json => {
                            out.push(Piece::Text(std::mem::take(&mut self.pending)));
                            self.state = State::Text;
                        }
                    }
                    true
                }
            },
            State::Arguments(mut scan) => {
                let end = scan.feed(&self.pending);
                let fragment: String = self
                    .pending
                    .drain(..end.unwrap_or(self.pending.len()))
                    .collect();
                if !fragment.is_empty() {
                    out.push(Piece::Arguments(fragment));
                }
                match end {
                    Some(_) => {
                        self.state = State::Tail;
                        true
                    }
                    None => {
                        self.state = State::Arguments(scan);
                        false
                    }
                }
            }
            State::Tail => {
                let close = match self.syntax {
                    CallSyntax::Hermes => CALL_CLOSE,
                    CallSyntax::Llama3Json => "",
                };
                match tail(&self.pending, close) {
                    Match::More => false,
                    Match::Done((), len) => {
                        self.pending.drain(..len);
                        out.push(Piece::CallEnd);
                        self.state = State::Text;
                        true
                    }
                    // Something else after the arguments: the call ends there.
                    Match::No => {
                        out.push(Piece::CallEnd);
                        self.state = State::Text;
                        true
                    }
                }
            }
            State::Whole => {
                let Some(end) = self.pending.find(CALL_CLOSE) else {
                    return false;
                };
                let body: String = self.pending[..end].to_string();
                self.pending.drain(..end + CALL_CLOSE.len());
                self.state = State::Text;
                out.extend(whole_call(&body));
                true
            }
        }
    }

    /// Content until a call starts.
    fn text(&mut self, out: &mut Vec<Piece>) -> bool {
        match self.syntax {
            CallSyntax::Hermes => {
                if let Some(start) = self.pending.find(CALL_OPEN) {
                    let before: String = self.pending[..start].to_string();
                    if !before.is_empty() {
                        out.push(Piece::Text(before));
                    }
                    self.pending.drain(..start + CALL_OPEN.len());
                    self.state = State::Head;
                    return true;
                }
                // Keep back the longest tail that could still become the marker.
                let keep = (1..CALL_OPEN.len())
                    .rev()
                    .find(|&k| {
                        self.pending.len() >= k
                            && self.pending.is_char_boundary(self.pending.len() - k)
                            && CALL_OPEN.starts_with(&self.pending[self.pending.len() - k..])
                    })
                    .unwrap_or(0);
                let emit = self.pending.len() - keep;
                if emit > 0 {
                    let text: String = self.pending.drain(..emit).collect();
                    out.push(Piece::Text(text));
                }
                false
            }
            CallSyntax::Llama3Json => {
                if self.at_start {
                    let Some(first) = self.pending.trim_start().chars().next() else {
                        return false; // only whitespace so far: held back
                    };
                    self.at_start = false;
                    if first == '{' {
                        let ws = self.pending.len() - self.pending.trim_start().len();
                        self.pending.drain(..ws);
                        self.state = State::Head;
                        return true;
                    }
                }
                if !self.pending.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut self.pending)));
                }
                false
            }
        }
    }

    /// The end of the output: what is held back, as text, or the end of an unfinished call.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        let state = std::mem::replace(&mut self.state, State::Text);
        let text = match state {
            State::Arguments(_) | State::Tail => return vec![Piece::CallEnd],
            State::Head | State::Whole if self.syntax == CallSyntax::Hermes => {
                format!("{CALL_OPEN}{rest}")
            }
            _ => rest,
        };
        if text.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(text)]
        }
    }
}

/// A Hermes call written other than the grammar writes it, parsed whole.
fn whole_call(body: &str) -> Vec<Piece> {
    match serde_json::from_str::<RawCall>(body.trim()) {
        Ok(call) => vec![
            Piece::CallStart { name: call.name },
            Piece::Arguments(match call.arguments {
                Value::Null => "{}".to_string(),
                v => v.to_string(),
            }),
            Piece::CallEnd,
        ],
        Err(_) => vec![Piece::Text(format!("{CALL_OPEN}{body}{CALL_CLOSE}"))],
    }
}

/// The outcome of matching the start of a text.
#[derive(Debug, PartialEq)]
enum Match<T> {
    /// Matched: the value and the bytes it took.
    Done(T, usize),
    /// The text so far is a prefix of a match.
    More,
    /// It cannot match.
    No,
}

/// A cursor over the start of a text for [`head`] and [`tail`].
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn skip_whitespace(&mut self) {
        let rest = &self.text[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    /// Whether `lit` follows (consumed): `Err(More)` when the text ends inside it.
    fn expect(&mut self, lit: &str) -> Result<(), Match<()>> {
        let rest = &self.text[self.at..];
        if rest.starts_with(lit) {
            self.at += lit.len();
            Ok(())
        } else if lit.starts_with(rest) {
            Err(Match::More)
        } else {
            Err(Match::No)
        }
    }

    /// A JSON string literal (consumed), decoded.
    fn string(&mut self) -> Result<String, Match<()>> {
        self.expect("\"")?;
        let start = self.at - 1;
        let bytes = self.text.as_bytes();
        let mut escape = false;
        for (i, &b) in bytes.iter().enumerate().skip(self.at) {
            match (escape, b) {
                (true, _) => escape = false,
                (false, b'\\') => escape = true,
                (false, b'"') => {
                    self.at = i + 1;
                    return serde_json::from_str(&self.text[start..self.at]).map_err(|_| Match::No);
                }
                _ => {}
            }
        }
        Err(Match::More)
    }
}

/// `{"name": "<name>", "<key>": ` followed by the arguments' opening brace: the name, and the
/// length up to that brace.
fn head(text: &str, key: &str) -> Match<String> {
    let mut c = Cursor { text, at: 0 };
    let parse = |c: &mut Cursor| -> Result<String, Match<()>> {
        c.skip_whitespace();
        c.expect("{")?;
        c.skip_whitespace();
        c.expect("\"name\"")?;
        c.skip_whitespace();
        c.expect(":")?;
        c.skip_whitespace();
        let name = c.string()?;
        c.skip_whitespace();
        c.expect(",")?;
        c.skip_whitespace();
        c.expect(&format!("\"{key}\""))?;
        c.skip_whitespace();
        c.expect(":")?;
        c.skip_whitespace();
        match c.text[c.at..].chars().next() {
            None => Err(Match::More),
            Some('{') => Ok(name),
            Some(_) => Err(Match::No),
        }
    };
    match parse(&mut c) {
        Ok(name) => Match::Done(name, c.at),
        Err(Match::More) => Match::More,
        Err(_) => Match::No,
    }
}

/// `}` and then `close` (when not empty), with whitespace between.
fn tail(text: &str, close: &str) -> Match<()> {
    let mut c = Cursor { text, at: 0 };
    let parse = |c: &mut Cursor| -> Result<(), Match<()>> {
        c.skip_whitespace();
        c.expect("}")?;
        if !close.is_empty() {
            c.skip_whitespace();
            c.expect(close)?;
        }
        Ok(())
    };
    match parse(&mut c) {
        Ok(()) => Match::Done((), c.at),
        Err(m) => m,
    }
}

/// Finds where a JSON object or array ends, across pushes: nesting depth, and whether the scan
/// is inside a string (and after a backslash there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Scan {
    depth: u32,
    in_string: bool,
    escape: bool,
}

impl Scan {
    /// Scans `text` (the continuation of what was scanned before); returns the length up to
    /// and including the value's last byte once the value ends.
    fn feed(&mut self, text: &str) -> Option<usize> {
        for (i, b) in text.bytes().enumerate() {
            if self.in_string {
                match (self.escape, b) {
                    (true, _) => self.escape = false,
                    (false, b'\\') => self.escape = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}
