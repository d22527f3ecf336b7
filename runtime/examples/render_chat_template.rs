//! Renders a chat template the way the runtime does, for comparison with Python's jinja2
//! (`tests/python/test_chat_templates.py`). Reads one JSON object on stdin:
//! `{"template": "...", "bos_token": "<s>", "eos_token": "</s>", "context": {...}}` and writes
//! the rendered text to stdout; a template error goes to stderr with exit status 1.

use std::io::{Read, Write};

use anyhow::Context;
use tollgate_runtime::chat_template::ChatTemplate;

fn main() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let request: serde_json::Value = serde_json::from_str(&input).context("stdin is not JSON")?;
    let text = |key: &str| {
        request
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let source = text("template").context("no `template`")?;
    let template = ChatTemplate::new(&source, text("bos_token"), text("eos_token"))?;
    let context = request
        .get("context")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let rendered = template.render_context(&context)?;
    std::io::stdout().write_all(rendered.as_bytes())?;
    Ok(())
}
