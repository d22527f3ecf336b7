//! The call parser on streamed chunks, and the grammars on the dev model's syntaxes.
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
