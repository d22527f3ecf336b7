//! Tool calls the model chooses to make: the triggers that mark where a call starts in free
//! text, and the grammar that takes over from there ([`super::GenConstraint::AfterTrigger`]).

use super::LateGrammar;
use crate::constraint::Constraint;
use crate::tokenizer::ModelTokenizer;
use crate::Result;

/// Where a model starts a call in free text. Matched against the output's bytes, control
/// tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The text, anywhere.
    Anywhere(String),
    /// The text as the first thing in the output after whitespace.
    AtStart(String),
}

impl Trigger {
    /// Where the trigger begins in `output`, of which `output[..scanned]` was looked at before
    /// (without a match). `Err(())` when it can no longer appear at all.
    fn find(&self, output: &[u8], scanned: usize) -> std::result::Result<Option<usize>, ()> {
        match self {
            Self::Anywhere(text) => {
                let from = scanned.saturating_sub(text.len().saturating_sub(1));
                Ok(find(&output[from..], text.as_bytes()).map(|at| from + at))
            }
            Self::AtStart(text) => {
                let Some(at) = output.iter().position(|b| !b.is_ascii_whitespace()) else {
                    return Ok(None);
                };
                let (seen, text) = (&output[at..], text.as_bytes());
                if seen.starts_with(text) {
                    Ok(Some(at))
                } else if text.starts_with(seen) {
                    Ok(None)
                } else {
                    Err(())
                }
            }
        }
    }
}

/// The output's bytes as far as a late grammar's triggers were looked for, so that each step
/// scans only the bytes its token added rather than decoding the whole output again.
#[derive(Debug, Default)]
pub(super) struct TriggerScan {
    bytes: Vec<u8>,
    /// `bytes[..ends[k]]` are the bytes of the first `k + 1` generated tokens.
    ends: Vec<usize>,
}

/// What [`start_late`] found.
pub(super) enum Late {
    /// No trigger yet.
    Waiting,
    /// No trigger can appear any more (the output began with something else): free text.
    Never,
    /// The grammar that takes over, advanced through the tokens so far.
    Started(Box<Constraint>),
}

/// When the generated text shows one of `triggers` (the first, when several), the grammar
/// that takes over from there: built from the text between the start of the token where the
/// trigger begins and the trigger, and advanced through the tokens from that one on. `scan`
/// holds what earlier calls saw of `generated`; only the tokens added since are scanned.
pub(super) fn start_late(
    tokenizer: &ModelTokenizer,
    scan: &mut TriggerScan,
    generated: &[u32],
    triggers: &[Trigger],
    then: &LateGrammar,
) -> Result<Late> {
    let scanned = scan.bytes.len();
    for &t in &generated[scan.ends.len()..] {
        scan.bytes.extend_from_slice(&tokenizer.token_bytes(t));
        scan.ends.push(scan.bytes.len());
    }
    let mut at = None;
    let mut possible = false;
    for t in triggers {
        match t.find(&scan.bytes, scanned) {
            Ok(Some(found)) => at = Some(at.map_or(found, |a: usize| a.min(found))),
            Ok(None) => possible = true,
            Err(()) => {}
        }
    }
    let Some(at) = at else {
        return Ok(if possible { Late::Waiting } else { Late::Never });
    };
    // The token where the trigger begins, and where that token begins.
    let first = scan.ends.iter().position(|&end| end > at).unwrap_or(0);
    let start = first.checked_sub(1).map_or(0, |k| scan.ends[k]);
    let before = String::from_utf8_lossy(&scan.bytes[start..at]);
    let mut c = then(&before)?;
    c.commit_all(&generated[first..])?;
    Ok(Late::Started(Box::new(c)))
}

/// The first position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::constraint::{ConstraintCompiler, Grammar};
    use crate::tools::{self, CallSyntax, ToolSpec};

    fn tokenizer() -> Arc<ModelTokenizer> {
        crate::tokenizer::dev_tokenizer()
    }

    fn late(compiler: &Arc<ConstraintCompiler>, syntax: CallSyntax) -> LateGrammar {
        let tools = vec![ToolSpec {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": false,
            }),
        }];
        let compiler = compiler.clone();
        Arc::new(move |before: &str| {
            compiler.compile(&Grammar::Lark(tools::late_grammar(
                &compiler, syntax, &tools, false, before,
            )))
        })
    }

    /// Feeds `rest` token by token into a late constraint; whether every token was allowed and
    /// the grammar then ended.
    fn completes(tokenizer: &ModelTokenizer, c: &mut Constraint, rest: &str) -> bool {
        let ids = tokenizer.encode(rest, false).unwrap();
        ids.iter().all(|&t| c.commit(t).is_ok()) && c.is_finished()
    }

    #[test]
    fn late_constraints_start_where_each_syntax_starts_a_call() {
        let tokenizer = tokenizer();
        let compiler =
            Arc::new(ConstraintCompiler::new(tokenizer.clone(), tokenizer.vocab_size()).unwrap());
        // The output fed one token at a time, as the engine does: the grammar once a
        // trigger appeared, `None` while none has (or none can any more).
        let start = |syntax: CallSyntax, text: &str| {
            let generated = tokenizer.encode(text, false).unwrap();
            let mut scan = TriggerScan::default();
            let mut found = None;
            for k in 1..=generated.len() {
                let then = late(&compiler, syntax);
                match start_late(
                    &tokenizer,
                    &mut scan,
                    &generated[..k],
                    &syntax.triggers(),
                    &then,
                )
                .unwrap()
                {
                    Late::Waiting => {}
                    Late::Never => return None,
                    Late::Started(c) => {
                        // The rest of the output goes to the grammar, as in the engine.
                        let mut c = *c;
                        for &t in &generated[k..] {
                            c.commit(t).unwrap();
                        }
                        found = Some(c);
                        break;
                    }
                }
            }
            found
        };
        // A trigger that appears later than the first scanned tokens is found as well when
        // the tokens arrive one at a time.
        let generated = tokenizer
            .encode("Let me check.\n<tool_call>\n{", false)
            .unwrap();
        let mut scan = TriggerScan::default();
        let then = late(&compiler, CallSyntax::Hermes);
        let triggers = CallSyntax::Hermes.triggers();
        let steps: Vec<bool> = (1..=generated.len())
            .map(|k| {
                matches!(
                    start_late(&tokenizer, &mut scan, &generated[..k], &triggers, &then).unwrap(),
                    Late::Started(_)
                )
            })
            .collect();
        // Found once, at the token that completes the marker (the engine then switches to the
        // grammar and scans no more).
        assert_eq!(steps.iter().filter(|&&s| s).count(), 1, "{steps:?}");
        let k = steps.iter().position(|&s| s).unwrap();
        let text = tokenizer.decode(&generated[..=k], false).unwrap();
        assert!(text.ends_with("<tool_call>"), "{text:?}");
        let text = tokenizer.decode(&generated[..k], false).unwrap();
        assert!(!text.contains("<tool_call>"), "{text:?}");
        // Llama 3's trigger must open the answer: once the answer began with prose, it can
        // never start, and the engine drops the late grammar.
        let generated = tokenizer.encode("It is sunny", false).unwrap();
        let mut scan = TriggerScan::default();
        let then = late(&compiler, CallSyntax::Llama3Json);
        assert!(matches!(
            start_late(
                &tokenizer,
                &mut scan,
                &generated,
                &CallSyntax::Llama3Json.triggers(),
                &then
            )
            .unwrap(),
            Late::Never
        ));

        // Hermes: the marker anywhere, prose before it included.
        assert!(start(CallSyntax::Hermes, "Let me check the weather").is_none());
        let mut c = start(
            CallSyntax::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
        )
        .unwrap();
        assert!(completes(
            &tokenizer,
            &mut c,
            "ty\": \"Paris\"}}\n</tool_call>"
        ));

        // Llama 3: a brace that opens the answer, leading whitespace allowed; not one later.
        assert!(start(CallSyntax::Llama3Json, "It is {sunny} in Paris").is_none());
        let mut c = start(
            CallSyntax::Llama3Json,
            " {\"name\": \"get_weather\", \"parameters\": {\"ci",
        )
        .unwrap();
        assert!(completes(&tokenizer, &mut c, "ty\": \"Paris\"}}"));
        // Once started, the call is held to the schema: Hermes' key is not allowed.
        let mut c = start(CallSyntax::Llama3Json, "{\"name\": \"get_weather\", \"").unwrap();
        assert!(!completes(
            &tokenizer,
            &mut c,
            "arguments\": {\"city\": \"Paris\"}}"
        ));
        // A tool that was not offered can never be named.
        let mut c = start(CallSyntax::Llama3Json, "{\"name\": \"").unwrap();
        assert!(!completes(
            &tokenizer,
            &mut c,
            "rm_rf\", \"parameters\": {}}"
        ));
    }
}
