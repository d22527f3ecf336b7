use super::*;

/// The general reading of `data`, as the stream read every event before this module.
fn general(data: &str) -> Option<Chunk<'static>> {
    let value = serde_json::from_str::<Value>(data).ok()?;
    Some(from_value(&value).into_owned())
}

/// Whether the typed reading takes `data` (else it is read the general way).
fn typed(data: &str) -> bool {
    serde_json::from_str::<Obj<Wire<'_>>>(data).is_ok()
}

/// Events upstreams send: each is read by the typed fields, with the general reading's result.
#[test]
fn usual_events_are_read_typed_as_the_general_reading_reads_them() {
    let usual = [
        r#"{"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"Hello, \"world\"\n\u00e9"},"finish_reason":null}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"service_tier":"flex"}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":"x","prompt_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"choices":[{"text":" a","index":0,"logprobs":{"tokens":[" a"],"token_logprobs":[-0.5],"top_logprobs":[{" a":-0.5," b":-1}]},"finish_reason":"length"}]}"#,
        r#"{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":"x","logprob":-0.1,"bytes":[120],"top_logprobs":[{"token":"y","logprob":-2}]}]}}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
        r#"{"choices":[{"delta":{"content":"x"},"text":"y"}],"service_tier":"scale"}"#,
        r#"{"error":{"message":"the engine stopped","type":"server_error"}}"#,
        r#"{"usage":{"input_tokens":3,"output_tokens":4,"prompt_tokens_details":7}}"#,
        r#"{}"#,
        r#"{"choices":null,"service_tier":null,"error":null}"#,
    ];
    for data in usual {
        assert!(typed(data), "{data}");
        assert_eq!(parse(data), general(data), "{data}");
    }
    let escaped =
        parse(r#"{"choices":[{"delta":{"content":"a\nb"},"finish_reason":"st\u006fp"}]}"#);
    let choice = escaped.and_then(|c| c.choice).expect("a choice");
    assert_eq!(choice.text, "a\nb");
    assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
    // Text without escapes is borrowed from the event, not copied.
    let plain = parse(r#"{"choices":[{"delta":{"content":"abc"}}]}"#);
    let choice = plain.and_then(|c| c.choice).expect("a choice");
    assert!(matches!(choice.text, Cow::Borrowed("abc")));
}

/// Events with fields of other types are read the general way, as before.
#[test]
fn unusual_events_are_read_as_before() {
    let unusual = [
        r#"{"choices":{"0":{"delta":{"content":"x"}}}}"#,
        r#"{"choices":["x"]}"#,
        r#"{"choices":[{"delta":"x","finish_reason":"stop"}]}"#,
        r#"{"choices":[{"delta":{"content":7},"text":"t"}]}"#,
        r#"{"choices":[{"delta":{"content":"x","tool_calls":{"a":1}},"finish_reason":1}]}"#,
        r#"{"choices":[{"delta":{"content":"a"}}],"choices":[{"delta":{"content":"b"}}]}"#,
        r#"{"choices":[{"delta":{"content":"x"}},{"delta":7}]}"#,
        r#"{"usage":5,"service_tier":1}"#,
        r#"{"usage":{"prompt_tokens":1,"input_tokens":2}}"#,
        r#"{"error":"broken"}"#,
        r#"[1,2]"#,
        r#"[[{"delta":{"content":"x"}}]]"#,
        r#"{"choices":[[null,"t","stop"]]}"#,
        r#"{"choices":[{"delta":[{"content":"x"}],"text":"t"}]}"#,
        r#"{"usage":[1,2]}"#,
        r#""text""#,
        r#"null"#,
    ];
    for data in unusual {
        assert_eq!(parse(data), general(data), "{data}");
    }
    assert!(!typed(unusual[0]));
    let repeated = parse(unusual[5]).and_then(|c| c.choice).expect("a choice");
    assert_eq!(
        repeated.text, "b",
        "the last of a repeated key, as a JSON object reads it"
    );
    assert_eq!(parse("data: not json"), None);
}
