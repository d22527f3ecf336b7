//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja the way Hugging Face renders it:
//! Python string methods (`.strip()`, `.startswith()`, ...), `raise_exception`,
//! `strftime_now`, `tojson`, trimmed blocks, and `add_generation_prompt`.
//!
//! A template is a program from the model file, so it runs sandboxed: a budget of
//! instructions ([`TEMPLATE_FUEL`]), a recursion limit and a bound on the text it writes
//! ([`TEMPLATE_OUTPUT_BYTES`]). Every template is trial-rendered when it is loaded, and one that
//! runs out of any of these on an ordinary conversation is refused then, not at request time.
//! (Memory a template builds without writing it, such as a string doubled in a loop, is not
//! bounded beyond what the instruction budget allows.)
//!
//! It turns messages into prompt text; tokenizing that text is the tokenizer's job. The Python
//! builtins templates call (`tojson`, `strftime_now`) are in `python.rs`.

use minijinja::{context, Environment, ErrorKind};

use crate::tools::CallSyntax;
use crate::{Error, Result};
use python::{python_tojson, strftime_now};

mod python;

/// Instructions one render may execute (a Llama 3.1 template with tools over a 200-message
/// conversation takes well under a tenth of this).
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting (loops, macro calls, includes) one render may reach.
const TEMPLATE_RECURSION: usize = 200;
/// Bytes one render may write: far beyond any context a model serves.
pub const TEMPLATE_OUTPUT_BYTES: usize = 32 << 20;

/// ChatML, for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The call syntax of a template that renders `tools` itself: `<tool_call>` (Hermes, Qwen
    /// 2.5 and the like) or Llama 3.1+'s JSON with `parameters`. Other templates get the tools
    /// through [`crate::tools::tools_prompt`], in the Hermes syntax.
    native_tools: Option<CallSyntax>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an [`Error::Template`] naming the problem.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        // Hugging Face renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(format!("cannot compile the chat template: {e}")))?;
        let template = Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            native_tools: native_tool_syntax(source),
        };
        template.trial_render()?;
        Ok(template)
    }

    /// Renders an ordinary conversation, with and without tools, and refuses the template if
    /// it exhausts the sandbox's limits. Errors of the template's own (`raise_exception` for
    /// a shape it does not accept, an undefined field) are left for request time.
    fn trial_render(&self) -> Result<()> {
        let messages = [
            serde_json::json!({"role": "system", "content": "You are a helpful assistant."}),
            serde_json::json!({"role": "user", "content": "What is the capital of France?"}),
            serde_json::json!({"role": "assistant", "content": "The capital of France is Paris."}),
            serde_json::json!({"role": "user", "content": "And of Italy?"}),
        ];
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        }}]);
        for tools in [None, Some(&tools)] {
            match self.render_json(&messages, tools, true) {
                Err(Error::Template(m)) if m.starts_with(SANDBOX) => {
                    return Err(Error::Template(format!(
                        "refused at load: rendering a four-message conversation{}: {m}",
                        if tools.is_some() { " with a tool" } else { "" }
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Renders within the output bound.
    fn render_value(&self, ctx: minijinja::Value) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut out = BoundedOutput(Vec::new());
        template
            .render_captured_to(ctx, &mut out)
            .map_err(template_error)?;
        String::from_utf8(out.0)
            .map_err(|_| Error::Template("the chat template wrote invalid UTF-8".into()))
    }

    /// Whether the template itself renders tools and tool calls.
    pub fn renders_tools(&self) -> bool {
        self.native_tools.is_some()
    }

    /// How the model writes calls: its template's syntax, else the fallback prompt's.
    pub fn call_syntax(&self) -> CallSyntax {
        self.native_tools.unwrap_or(CallSyntax::Hermes)
    }

    /// Renders messages given as JSON objects in Hugging Face's shape (`role`, `content`,
    /// `tool_calls`, `tool_call_id`), with `tools` (OpenAI function definitions) when given;
    /// without, `tools` is left undefined, as Hugging Face leaves it.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        let ctx = match tools {
            Some(tools) => context! { tools => tools, ..base },
            None => base,
        };
        self.render_value(ctx)
    }

    /// The ChatML template.
    pub fn chatml() -> Result<Self> {
        Self::new(CHATML, None, Some("<|im_end|>".into()))
    }

    /// Renders `(role, content)` messages; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        self.render_json(&messages, None, add_generation_prompt)
    }
}

/// The call syntax of a template that renders tools: Meta's Llama 3.1+ templates ask for
/// `{"name": …, "parameters": …}` and take results in the `ipython` role; Hermes-style ones
/// write `<tool_call>`.
fn native_tool_syntax(source: &str) -> Option<CallSyntax> {
    if !source.contains("tools") {
        None
    } else if source.contains(crate::tools::CALL_OPEN) {
        Some(CallSyntax::Hermes)
    } else if source.contains("\"parameters\"") && source.contains("ipython") {
        Some(CallSyntax::Llama3Json)
    } else {
        None
    }
}

/// How the errors of the sandbox's limits begin.
const SANDBOX: &str = "sandbox limit:";

/// Rendered text, refusing to grow past [`TEMPLATE_OUTPUT_BYTES`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_OUTPUT_BYTES {
            return Err(std::io::Error::other("output bound"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(e: minijinja::Error) -> Error {
    match e.kind() {
        ErrorKind::OutOfFuel => Error::Template(format!(
            "{SANDBOX} the chat template ran past its budget of {TEMPLATE_FUEL} instructions"
        )),
        ErrorKind::WriteFailure => Error::Template(format!(
            "{SANDBOX} the chat template wrote more than {TEMPLATE_OUTPUT_BYTES} bytes"
        )),
        ErrorKind::InvalidOperation if e.detail() == Some("recursion limit exceeded") => {
            Error::Template(format!(
                "{SANDBOX} the chat template nested deeper than {TEMPLATE_RECURSION} levels"
            ))
        }
        // raise_exception: the template's own words, e.g. "roles must alternate".
        ErrorKind::InvalidOperation => {
            Error::Template(e.detail().unwrap_or("template error").to_string())
        }
        _ => Error::Template(format!("cannot render the chat template: {e}")),
    }
}

impl ChatTemplate {
    /// Renders with a whole Jinja context (`messages` with tool calls, `tools`,
    /// `add_generation_prompt`, `date_string`, ...) given as JSON, plus `bos_token` and
    /// `eos_token` unless the context sets them.
    pub fn render_context(&self, context: &serde_json::Value) -> Result<String> {
        let mut ctx = match context {
            serde_json::Value::Object(map) => map.clone(),
            other => {
                return Err(Error::Template(format!(
                    "a template context is a JSON object, not {other}"
                )))
            }
        };
        ctx.entry("bos_token")
            .or_insert_with(|| self.bos_token.clone().into());
        ctx.entry("eos_token")
            .or_insert_with(|| self.eos_token.clone().into());
        self.render_value(minijinja::Value::from_serialize(&ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::python::strftime;
    use super::*;

    fn msgs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn renders_the_dev_models_template_exactly() {
        let tok = crate::tokenizer::dev_tokenizer();
        let t = ChatTemplate::new(tok.chat_template().unwrap(), None, None).unwrap();
        let conversation = msgs(&[
            ("system", "You are a helpful assistant."),
            ("user", "What is the capital of France?"),
        ]);
        assert_eq!(
            t.render(&conversation, true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Without a system message the template adds its own; without the generation prompt
        // the text ends after the last message.
        assert_eq!(
            t.render(&msgs(&[("user", "Hi")]), false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_specials_work() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}|{{ m.role | tojson }}{% endfor %}{{ eos_token }}",
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "  hi  ")]), false).unwrap(),
            "<s>HI|\"user\"</s>"
        );
    }

    #[test]
    fn raise_exception_and_bad_syntax_are_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}",
            None,
            None,
        )
        .unwrap();
        let err = t.render(&msgs(&[("assistant", "x")]), true).unwrap_err();
        assert!(
            matches!(&err, Error::Template(m) if m.contains("roles must alternate")),
            "{err}"
        );
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(Error::Template(_))
        ));
    }

    /// Templates that loop, nest or write without end are refused when they are loaded, with
    /// an error naming the limit; ones within the limits load and render.
    #[test]
    fn runaway_templates_are_refused_at_load() {
        let refused = |source: &str, limit: &str| {
            let err = ChatTemplate::new(source, None, None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("refused at load"), "{source}: {err}");
            assert!(err.contains(limit), "{source}: {err}");
        };
        // 10^10 iterations: the instruction budget ends it.
        refused(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "instructions",
        );
        // A macro calling itself without end.
        refused(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "nested deeper",
        );
        // 100 MB of text from a few thousand instructions.
        refused(
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            "bytes",
        );
        // Within the limits: 20,000 iterations and 2 MB of text are served.
        let t = ChatTemplate::new(
            "{% for i in range(20000) %}{{ 'y' * 100 }}{% endfor %}{{ messages[0]['content'] }}",
            None,
            None,
        )
        .unwrap();
        let text = t.render(&msgs(&[("user", "end")]), true).unwrap();
        assert_eq!(text.len(), 2_000_003);
        // A template that only explodes on some input is caught at request time, as an
        // error, never a hang.
        let t = ChatTemplate::new(
            "{% if messages | length > 4 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}ok",
            None,
            None,
        )
        .unwrap();
        let long = msgs(&[("user", "a"); 5]);
        let err = t.render(&long, true).unwrap_err().to_string();
        assert!(err.contains("instructions"), "{err}");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-23 12:34:56 UTC
        assert_eq!(
            strftime(1_721_738_096, "%d %b %Y %H:%M:%S"),
            "23 Jul 2024 12:34:56"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %B"), "1970-01-01 January");
        let chatml = ChatTemplate::chatml().unwrap();
        assert!(chatml
            .render(&msgs(&[("user", "a")]), true)
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
    }
}
