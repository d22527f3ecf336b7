//! Tool calling for models that write calls as text: how the tools are shown to a model whose
//! chat template does not render them, the grammars that make a call valid by construction,
//! and the parser that turns generated text back into calls, streamed as they are written.
//!
//! Two call syntaxes ([`CallSyntax`]):
//!
//! * **Hermes** (SmolLM, Hermes, Qwen, and the fallback prompt for templates without tools):
//!
//!   ```text
//!   <tool_call>
//!   {"name": "get_weather", "arguments": {"city": "Paris"}}
//!   </tool_call>
//!   ```
//!
//! * **Llama 3.1+ JSON**: the answer is the call, `{"name": "get_weather", "parameters":
//!   {"city": "Paris"}}`, optionally after `<|python_tag|>`, and the turn ends. Meta's templates
//!   render one call per assistant message, so this syntax carries one call per answer.
//!
//! A forced call (`tool_choice` `required` or a named function) is constrained from the first
//! token; with `auto` the model writes freely and the call is constrained from the moment it
//! starts one ([`crate::engine::GenConstraint::AfterTrigger`]): `<tool_call>` anywhere, or for
//! Llama 3 a `{` or `<|python_tag|>` that opens the answer. Either way the name is one of the
//! offered tools and the arguments validate against its parameters schema.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::constraint::{with_json_options, ConstraintCompiler};
use crate::engine::Trigger;

/// The marker that opens a Hermes call.
pub const CALL_OPEN: &str = "<tool_call>";
/// The marker that closes a Hermes call.
pub const CALL_CLOSE: &str = "</tool_call>";
/// The control token Llama 3.1+ may write before a call.
pub const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallSyntax {
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, any number per answer.
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the whole answer, `<|python_tag|>` optional.
    Llama3Json,
}

impl CallSyntax {
    /// The key of the arguments object.
    pub fn arguments_key(self) -> &'static str {
        match self {
            Self::Hermes => "arguments",
            Self::Llama3Json => "parameters",
        }
    }

    /// Where a call the model chose to write (`auto`) begins.
    pub fn triggers(self) -> Vec<Trigger> {
        match self {
            Self::Hermes => vec![Trigger::Anywhere(CALL_OPEN.into())],
            Self::Llama3Json => vec![
                Trigger::AtStart(PYTHON_TAG.into()),
                Trigger::AtStart("{".into()),
            ],
        }
    }
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// Which calls the grammar allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallMode {
    /// At least one call, of any offered tool, and nothing else.
    Required,
    /// Exactly the named tool, and nothing else.
    Named(String),
}

/// The system-prompt text that states the tools to a model whose chat template has no tool
/// support (the documented fallback): the functions as JSON signatures and the call format.
pub fn tools_prompt(tools: &[ToolSpec]) -> String {
    let mut out = String::from(
        "You may call functions to help with the user's request. The functions are listed as JSON inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        let sig = json!({
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description.clone().unwrap_or_default(),
                "parameters": t.parameters,
            }
        });
        out.push_str(&sig.to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\nTo call a function, answer with one JSON object per call, each inside <tool_call></tool_call>:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call>",
    );
    out
}

/// How an earlier assistant call is written back into the conversation for such a model.
pub fn render_call(name: &str, arguments: &str) -> String {
    let arguments: Value =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
    format!(
        "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
        json!({"name": name, "arguments": arguments})
    )
}

/// How a tool result is written back for such a model.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The schema of one call: `{"name": <one of the tools>, <arguments key>: <its parameters>}`.
/// llguidance writes properties in schema order, so the name always comes first (the parser
/// streams the arguments because of that).
fn call_schema(syntax: CallSyntax, tools: &[&ToolSpec]) -> Value {
    let options: Vec<Value> = tools
        .iter()
        .map(|t| {
            let parameters = match &t.parameters {
                Value::Null => json!({"type": "object"}),
                p => p.clone(),
            };
            let mut properties = serde_json::Map::new();
            properties.insert("name".into(), json!({"const": t.name}));
            properties.insert(syntax.arguments_key().into(), parameters);
            json!({
                "type": "object",
                "properties": properties,
                "required": ["name", syntax.arguments_key()],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if options.len() == 1 {
        options.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({"anyOf": options})
    };
    with_json_options(&schema)
}

/// A Lark literal: a control token by name where the vocabulary has it as one, else text.
fn literal(compiler: &ConstraintCompiler, text: &str) -> String {
    if compiler.is_special_token(text) {
        text.to_string()
    } else {
        Value::String(text.to_string()).to_string()
    }
}

/// The Lark rules of calls: `calls` is one call, or for Hermes with `parallel` up to one per
/// offered tool (a small model asked for "one or more" calls tends to repeat its call until
/// the token limit; the bound ends the output once every tool could have been called).
fn call_rules(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
    tools: &[&ToolSpec],
    parallel: bool,
) -> String {
    let schema = call_schema(syntax, tools);
    match syntax {
        CallSyntax::Hermes => {
            let max_calls = if parallel { tools.len().max(1) } else { 1 };
            let mut calls = String::from("call_block");
            for _ in 1..max_calls {
                calls = format!("call_block (\"\\n\"? {calls})?");
            }
            format!(
                "calls: {calls}\ncall_block: {open} \"\\n\"? call \"\\n\"? {close}\ncall: %json {schema}\n",
                open = literal(compiler, CALL_OPEN),
                close = literal(compiler, CALL_CLOSE),
            )
        }
        CallSyntax::Llama3Json => {
            // The tag only where the vocabulary has it as a control token.
            let tag = if compiler.is_special_token(PYTHON_TAG) {
                format!("{PYTHON_TAG}? ")
            } else {
                String::new()
            };
            format!("calls: {tag}call\ncall: %json {schema}\n")
        }
    }
}

fn offered<'a>(tools: &'a [ToolSpec], mode: Option<&CallMode>) -> Vec<&'a ToolSpec> {
    match mode {
        Some(CallMode::Named(name)) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    }
}

/// The grammar of a forced call: the output is one call (several when `parallel`, the mode is
/// `Required` and the syntax allows it) and nothing else.
pub fn forced_grammar(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
    tools: &[ToolSpec],
    mode: &CallMode,
    parallel: bool,
) -> String {
    let tools = offered(tools, Some(mode));
    let parallel = parallel && matches!(mode, CallMode::Required);
    format!(
        "start: calls\n{}",
        call_rules(compiler, syntax, &tools, parallel)
    )
}

/// The grammar that takes over when a model that may choose (`auto`) starts a call: the text it
/// wrote from the start of the token where the trigger begins (`before`), then calls.
pub fn late_grammar(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
    tools: &[ToolSpec],
    parallel: bool,
    before: &str,
) -> String {
    let tools = offered(tools, None);
    let prefix = if before.is_empty() {
        String::new()
    } else {
        format!("{} ", Value::String(before.to_string()))
    };
    format!(
        "start: {prefix}calls\n{}",
        call_rules(compiler, syntax, &tools, parallel)
    )
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A call as the pieces of one finished call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Out {
        Text(String),
        Call(String, String),
        /// A call the output ended inside.
        Open(String, String),
    }

    fn run_with(syntax: CallSyntax, chunks: &[&str]) -> Vec<Out> {
        let mut p = CallParser::new(syntax);
        let mut pieces: Vec<Piece> = chunks.iter().flat_map(|c| p.push(c)).collect();
        pieces.extend(p.finish());
        let mut out: Vec<Out> = Vec::new();
        for piece in pieces {
            match (out.last_mut(), piece) {
                (Some(Out::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, Piece::Text(b)) => out.push(Out::Text(b)),
                (_, Piece::CallStart { name }) => out.push(Out::Open(name, String::new())),
                (Some(Out::Open(_, args)), Piece::Arguments(a)) => args.push_str(&a),
                (Some(last @ Out::Open(..)), Piece::CallEnd) => {
                    if let Out::Open(n, a) = last.clone() {
                        *last = Out::Call(n, a);
                    }
                }
                (_, piece) => panic!("{piece:?} outside a call"),
            }
        }
        out
    }

    fn run(chunks: &[&str]) -> Vec<Out> {
        run_with(CallSyntax::Hermes, chunks)
    }

    fn text(s: &str) -> Out {
        Out::Text(s.into())
    }

    fn call(name: &str, args: &str) -> Out {
        Out::Call(name.into(), args.into())
    }

    /// Every way of cutting `whole` in two, and one character at a time, gives `want`.
    fn every_split(syntax: CallSyntax, whole: &str, want: &[Out]) {
        assert_eq!(run_with(syntax, &[whole]), want);
        for cut in (1..whole.len()).filter(|&c| whole.is_char_boundary(c)) {
            assert_eq!(
                run_with(syntax, &[&whole[..cut], &whole[cut..]]),
                want,
                "cut at {cut}"
            );
        }
        let chars: Vec<String> = whole.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run_with(syntax, &refs), want);
    }

    #[test]
    fn calls_split_from_text_across_chunk_boundaries() {
        let whole = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris}\\\"{\", \"days\": [1, {\"x\": 2}]}}\n</tool_call>";
        every_split(
            CallSyntax::Hermes,
            whole,
            &[
                text("Let me check.\n"),
                call(
                    "get_weather",
                    "{\"city\": \"Paris}\\\"{\", \"days\": [1, {\"x\": 2}]}",
                ),
            ],
        );
    }

    #[test]
    fn arguments_stream_before_the_call_is_complete() {
        let mut p = CallParser::new(CallSyntax::Hermes);
        let mut seen = p.push("<tool_call>\n{\"name\": \"f\", \"arg");
        assert!(seen.is_empty(), "{seen:?}");
        seen = p.push("uments\": {\"q\": \"long");
        assert_eq!(
            seen,
            vec![
                Piece::CallStart { name: "f".into() },
                Piece::Arguments("{\"q\": \"long".into())
            ]
        );
        assert_eq!(
            p.push(" text\"}"),
            vec![Piece::Arguments(" text\"}".into())]
        );
        assert_eq!(p.push("}\n</tool_"), vec![]);
        assert_eq!(p.push("call>"), vec![Piece::CallEnd]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn an_output_cut_inside_the_arguments_ends_the_call() {
        assert_eq!(
            run(&["<tool_call>{\"name\": \"f\", \"arguments\": {\"q\": \"ab"]),
            vec![call("f", "{\"q\": \"ab")]
        );
        // Cut before the name was complete: nothing was streamed, it stays text.
        assert_eq!(
            run(&["<tool_call>{\"name\": \"f"]),
            vec![text("<tool_call>{\"name\": \"f")]
        );
    }

    #[test]
    fn plain_text_and_lookalikes_stay_text() {
        assert_eq!(run(&["a < b <tool", " c"]), vec![text("a < b <tool c")]);
        assert_eq!(
            run(&["<tool_call>{not json"]),
            vec![text("<tool_call>{not json")]
        );
        assert_eq!(
            run(&["<tool_call>{bad}</tool_call>"]),
            vec![text("<tool_call>{bad}</tool_call>")]
        );
    }

    #[test]
    fn a_call_written_in_another_key_order_parses_whole() {
        assert_eq!(
            run(&["<tool_call>{\"arguments\": {\"x\": 1}, \"name\": \"f\"}</tool_call>"]),
            vec![call("f", "{\"x\":1}")]
        );
    }

    #[test]
    fn parallel_calls() {
        let text_ = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}\n</tool_call>";
        every_split(
            CallSyntax::Hermes,
            text_,
            &[call("a", "{}"), text("\n"), call("b", "{\"x\": 1}")],
        );
    }

    #[test]
    fn rendered_calls_parse_back() {
        let rendered = render_call("f", "{\"q\": \"x\"}");
        assert_eq!(run(&[&rendered]), vec![call("f", "{\"q\":\"x\"}")]);
    }

    #[test]
    fn llama3_calls_open_the_answer() {
        every_split(
            CallSyntax::Llama3Json,
            " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            &[call("get_weather", "{\"city\": \"Paris\"}")],
        );
        // Prose, even with braces later or at the start, is text.
        assert_eq!(
            run_with(CallSyntax::Llama3Json, &["It is {sunny}", " today."]),
            vec![text("It is {sunny} today.")]
        );
        assert_eq!(
            run_with(CallSyntax::Llama3Json, &["{sunny} today"]),
            vec![text("{sunny} today")]
        );
        // The Hermes key is not a Llama 3 call.
        assert_eq!(
            run_with(
                CallSyntax::Llama3Json,
                &["{\"name\": \"f\", \"arguments\": {}}"]
            ),
            vec![text("{\"name\": \"f\", \"arguments\": {}}")]
        );
    }
}
