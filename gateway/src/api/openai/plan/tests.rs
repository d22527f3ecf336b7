use super::*;

fn chat(body: serde_json::Value) -> Result<Plan, ApiError> {
    serde_json::from_value::<ChatRequest>(body)
        .unwrap()
        .plan("id", 8)
}

#[test]
fn validates_ranges_with_named_params() {
    let base = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut b = base.clone();
    b["temperature"] = 3.5.into();
    let e = chat(b).unwrap_err();
    assert!(
        matches!(&e, ApiError::InvalidRequest { param: Some(p), message } if p == "temperature" && message.contains("3.5")),
        "{e:?}"
    );
    let mut b = base.clone();
    b["n"] = 9.into();
    assert!(chat(b).is_err());
    let mut b = base.clone();
    b["stop"] = serde_json::json!(["a", "b", "c", "d", "e"]);
    assert!(chat(b).is_err());
    let mut b = base.clone();
    b["messages"] = serde_json::json!([]);
    assert!(chat(b).is_err());
    let mut b = base.clone();
    b["top_logprobs"] = 2.into();
    assert!(chat(b).is_err());
    let mut b = base;
    b["messages"] = serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    b["n"] = 2.into();
    b["seed"] = 5.into();
    let plan = chat(b).unwrap();
    assert_eq!(plan.choices.len(), 2);
    assert_eq!(plan.choices[1].params.seed, Some(6));
    assert_eq!(
        plan.choices[0].prompt,
        Prompt::Chat(vec![ChatMessage::new("user", "ab")])
    );
}

/// `prediction` reaches every choice as its text (a string, or text parts joined), with the
/// arguments OpenAI refuses beside it (the engine is exact with them); a type other than
/// `content`, or parts other than text, are a 400 naming the field.
#[test]
fn a_prediction_reaches_every_choice_and_bad_ones_are_named() {
    let base = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let with = |prediction: serde_json::Value| {
        let mut b = base.clone();
        b["prediction"] = prediction;
        b
    };
    let mut b = with(serde_json::json!({"type": "content", "content": "fn main() {}"}));
    b["n"] = 2.into();
    b["logprobs"] = true.into();
    b["top_logprobs"] = 2.into();
    b["presence_penalty"] = 0.5.into();
    b["max_completion_tokens"] = 9.into();
    let plan = chat(b).unwrap();
    assert_eq!(plan.choices.len(), 2);
    for c in &plan.choices {
        assert_eq!(c.prediction.as_deref(), Some("fn main() {}"));
    }
    let parts = serde_json::json!({"type": "content", "content": [
        {"type": "text", "text": "fn "}, {"type": "text", "text": "main"}]});
    let plan = chat(with(parts)).unwrap();
    assert_eq!(plan.choices[0].prediction.as_deref(), Some("fn main"));
    // None, or empty: no prediction.
    assert_eq!(chat(base.clone()).unwrap().choices[0].prediction, None);
    let empty = chat(with(serde_json::json!({"type": "content", "content": ""}))).unwrap();
    assert_eq!(empty.choices[0].prediction, None);
    for (bad, param) in [
        (
            serde_json::json!({"type": "file", "content": "x"}),
            "prediction.type",
        ),
        (
            serde_json::json!({"type": "content", "content": [{"type": "image_url", "text": "x"}]}),
            "prediction.content",
        ),
    ] {
        let e = chat(with(bad)).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == param),
            "{e:?}"
        );
    }
}
