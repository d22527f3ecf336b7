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
