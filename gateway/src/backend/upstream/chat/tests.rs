use super::*;

fn request(tier: ServiceTier) -> GenerateRequest {
    GenerateRequest {
        request_id: "r".into(),
        model: "m".into(),
        prompt: Prompt::Text("hi".into()),
        params: SamplingParams::default(),
        response_format: ResponseFormat::default(),
        tools: None,
        customer: None,
        scheduling_weight: None,
        service_tier: tier,
        max_queue_wait: None,
        prediction: None,
        adapter: None,
    }
}

#[test]
fn the_tier_goes_in_the_body_unless_default_or_not_forwarded() {
    let (_, flex) = request_body("up", &request(ServiceTier::Flex), true);
    assert_eq!(flex["service_tier"], "flex");
    let (_, default) = request_body("up", &request(ServiceTier::Default), true);
    assert!(default.get("service_tier").is_none());
    let (_, off) = request_body("up", &request(ServiceTier::Priority), false);
    assert!(off.get("service_tier").is_none());
    let (_, reserved) = request_body("up", &request(ServiceTier::Reserved), true);
    assert_eq!(reserved["service_tier"], "priority");
    let (_, batch) = request_body("up", &request(ServiceTier::Batch), true);
    assert_eq!(batch["service_tier"], "flex");
}

/// An event's data as it arrives.
fn read(chunk: &Value) -> Chunk<'static> {
    let data = chunk.to_string();
    chunk::parse(&data).expect("JSON is read").into_owned()
}

/// The usage the fold's end finishes with.
fn finish_usage(fold: ChunkFold) -> Option<Usage> {
    fold.end(None, "up").into_iter().find_map(|r| match r {
        Read::Event(GenerateEvent::Finished { usage, .. }) => Some(usage),
        _ => None,
    })
}

#[test]
fn the_tier_an_upstream_reports_is_on_the_finish() {
    let count = |t: &str| u32::try_from(t.len()).unwrap_or(u32::MAX);
    let mut fold = ChunkFold::new(3);
    let chunk = json!({"service_tier": "default", "choices": [{"delta": {"content": "hi"}}]});
    fold.on_chunk(read(&chunk), &count);
    let last = json!({"service_tier": "flex", "choices": [{"delta": {}, "finish_reason": "stop"}]});
    fold.on_chunk(read(&last), &count);
    let finished = finish_usage(fold);
    assert_eq!(
        finished.and_then(|u| u.service_tier),
        Some(ServiceTier::Flex)
    );
    // An unknown or absent tier reports nothing.
    let mut fold = ChunkFold::new(3);
    let odd = json!({"service_tier": "scale", "choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]});
    fold.on_chunk(read(&odd), &count);
    let finished = finish_usage(fold);
    assert_eq!(finished.map(|u| u.service_tier), Some(None));
}

/// A prediction goes upstream as OpenAI's `prediction`, and the upstream's counts of its
/// tokens come back on the finish (none when it reports none, or reports them badly).
#[test]
fn a_prediction_goes_upstream_and_its_counts_come_back() {
    let mut r = request(ServiceTier::Default);
    r.prompt = Prompt::Chat(vec![crate::backend::ChatMessage::new("user", "hi")]);
    let (_, plain) = request_body("up", &r, true);
    assert!(plain.get("prediction").is_none());
    r.prediction = Some("fn main() {}".into());
    let (_, body) = request_body("up", &r, true);
    assert_eq!(
        body["prediction"],
        json!({"type": "content", "content": "fn main() {}"})
    );
    let usage = |details: Value| {
        let u = json!({"prompt_tokens": 5, "completion_tokens": 9, "completion_tokens_details": details});
        settled_usage(UpstreamUsage::read(&u), 5, 9)
    };
    let u = usage(json!({"accepted_prediction_tokens": 6, "rejected_prediction_tokens": 2}));
    assert_eq!(
        (u.accepted_prediction_tokens, u.rejected_prediction_tokens),
        (6, 2)
    );
    let u = usage(json!({"accepted_prediction_tokens": "six"}));
    assert_eq!(
        (u.accepted_prediction_tokens, u.rejected_prediction_tokens),
        (0, 0)
    );
}
