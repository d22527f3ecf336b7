//! A chat request's tools and `tool_choice`, checked against each other.

use super::*;

pub(super) fn tools_request(
    tools: Option<Vec<ToolIn>>,
    choice: Option<ToolChoiceIn>,
    parallel: Option<bool>,
) -> Result<Option<ToolsRequest>, ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        if choice.is_some() {
            return Err(ApiError::invalid(
                "tool_choice is only allowed when tools are specified - 'tool_choice'",
                "tool_choice",
            ));
        }
        return Ok(None);
    };
    let mut defs: Vec<ToolDef> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        let def = tool_def(i, t, &defs)?;
        defs.push(def);
    }
    let choice = tool_choice(choice, &defs)?;
    Ok(Some(ToolsRequest {
        tools: defs,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// Tool `i` of the request, checked against those before it.
fn tool_def(i: usize, t: ToolIn, defs: &[ToolDef]) -> Result<ToolDef, ApiError> {
    if t.kind != "function" {
        return Err(invalid_at(
            format!("tools.[{i}].type"),
            format!("tool type `{}` is not supported; only `function`", t.kind),
        ));
    }
    let name = t.function.name;
    if !valid_name(&name) {
        return Err(invalid_at(
            format!("tools.[{i}].function.name"),
            format!("`{name}` is not a valid function name (1-64 of a-z, A-Z, 0-9, _ and -)"),
        ));
    }
    if defs.iter().any(|d| d.name == name) {
        return Err(invalid_at(
            format!("tools.[{i}].function.name"),
            format!("the function name `{name}` is given twice"),
        ));
    }
    let parameters = t
        .function
        .parameters
        .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
    if !parameters.is_object() {
        return Err(invalid_at(
            format!("tools.[{i}].function.parameters"),
            "parameters must be a JSON Schema object".into(),
        ));
    }
    Ok(ToolDef {
        name,
        description: t.function.description,
        parameters,
        strict: t.function.strict,
    })
}

/// `tool_choice`, checked against the tools.
fn tool_choice(choice: Option<ToolChoiceIn>, defs: &[ToolDef]) -> Result<ToolChoice, ApiError> {
    Ok(match choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceIn::Mode(m)) => match m.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    format!("`{other}` is not a valid tool_choice (none, auto, required or a named function) - 'tool_choice'"),
                    "tool_choice",
                ))
            }
        },
        Some(ToolChoiceIn::Named(n)) => {
            if n.kind != "function" {
                return Err(ApiError::invalid(
                    format!("tool_choice type `{}` is not supported; only `function` - 'tool_choice.type'", n.kind),
                    "tool_choice.type",
                ));
            }
            if !defs.iter().any(|d| d.name == n.function.name) {
                return Err(ApiError::invalid(
                    format!("tool_choice names the function `{}`, which is not in tools - 'tool_choice.function.name'", n.function.name),
                    "tool_choice.function.name",
                ));
            }
            ToolChoice::Function(n.function.name)
        }
    })
}
