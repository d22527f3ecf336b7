"""Tool calling through the official OpenAI SDK, unchanged, against the real model, in both
setups (the embedded server, and a gateway routing to a `tollgate worker` that passes `tools`
through and reads the worker's calls back): forced, named, parallel and automatic calls, the
function-calling loop streamed and not, their billing, and the Llama 3.1+ call syntax. The
guarantees come from constrained decoding (see `test_structured.py`)."""

import json
import os
import threading
from pathlib import Path

import httpx
import jsonschema
import pytest
from openai import OpenAI

from conftest import API_KEY, ROOT, start_server, stop_server, write_config
from structured_common import ASK, MODEL, SYSTEM, TIME, WEATHER, api, routed  # noqa: F401 (the `routed` fixture `api` asks for)


# ---- tools -----------------------------------------------------------------------------------------


def check_call(call, tools):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in by_name
    jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


def test_required_and_named_always_call_and_none_never_does(api):
    questions = ["What is the weather like in Paris today?", "Is it raining in Tokyo?",
                 "What time is it in Berlin?", "Tell me a joke."]
    for seed, q in enumerate(questions):
        messages = [SYSTEM, {"role": "user", "content": q}]
        r = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                        tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        calls = r.choices[0].message.tool_calls
        assert calls, r.choices[0].message
        for call in calls:
            check_call(call, [WEATHER, TIME])
        assert r.choices[0].finish_reason == "tool_calls"
        r = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        temperature=1.0, seed=seed, max_tokens=120)
        calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        check_call(calls[0], [TIME])
        assert r.choices[0].message.content is None
        assert r.choices[0].finish_reason == "stop"  # as OpenAI: a forced function ends with stop
        r = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                        tool_choice="none", temperature=1.0, seed=seed, max_tokens=40)
        assert not r.choices[0].message.tool_calls
        assert r.choices[0].message.content


def test_parallel_tool_calls_false_gives_one_call(api):
    r = api.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(r.choices[0].message.tool_calls) == 1


def weather(arguments):
    args = json.loads(arguments)
    return json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"], "sky": "sunny"})


def test_function_calling_loop(api):
    """Turn 1: the model calls the tool. The test runs it and answers with a `tool` message.
    Turn 2: the model answers the user in prose."""
    messages = list(ASK)
    r = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_tokens=100)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        check_call(call, [WEATHER])
        messages.append({"role": "tool", "tool_call_id": call.id, "content": weather(call.function.arguments)})
    r = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_tokens=60)
    answer = r.choices[0].message
    assert not answer.tool_calls
    assert answer.content and "<tool_call>" not in answer.content
    assert r.usage.prompt_tokens > 100  # the tools, the call and its result were in the prompt


def test_function_calling_loop_streamed(api):
    messages = list(ASK)
    stream = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                         temperature=0, max_tokens=100, stream=True,
                                         stream_options={"include_usage": True})
    calls, finish, content, usage = {}, None, "", None
    saw_header_first, fragments = [], {}
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for part in choice.delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            if entry["id"] is None:
                saw_header_first.append(part.id is not None and part.function.name is not None)
            if part.id:
                entry["id"] = part.id
            if part.function and part.function.name:
                entry["name"] = part.function.name
            if part.function and part.function.arguments:
                entry["arguments"] += part.function.arguments
                fragments[part.index] = fragments.get(part.index, 0) + 1
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert calls and all(saw_header_first)
    # The arguments stream as the model writes them, not in one piece at the end.
    assert all(fragments.get(i, 0) > 1 for i in calls), fragments
    whole = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=100)
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls.values()]
    assert content == ""
    assert usage.completion_tokens > 5
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]})
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), WEATHER["function"]["parameters"])
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": weather(c["arguments"])})
    stream = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=60, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()


def earlier_calls():
    """Two earlier turns in which the assistant called `get_weather` and answered from its
    result: an agent's conversation. Without them the 135M model never starts a call by itself
    (0 of 80 sampled answers to weather questions did), so `auto` would only ever be tested on
    prose."""
    turns = []
    for city, result, answer in [("Paris", '{"temp": 18, "sky": "sunny"}', "It is 18 degrees and sunny in Paris."),
                                 ("Oslo", '{"temp": 3, "sky": "snow"}', "It is 3 degrees and snowing in Oslo.")]:
        cid = f"call_{city.lower()}"
        turns += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": cid, "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]},
            {"role": "tool", "tool_call_id": cid, "content": result},
            {"role": "assistant", "content": answer},
        ]
    return turns


# The 135M model, asked to call again, opens with `<tool_response>` as often as `<tool_call>`:
# banning the token "response" (id 7639) leaves it the right tag. It still chooses between a call
# and prose ("Hello, who are you?" is answered in prose).
NOT_RESPONSE = {"7639": -100}


def test_auto_lets_the_model_choose_and_constrains_a_call_it_starts(api):
    """With `auto` the model may answer in prose; when it writes a call, the call is valid."""
    outcomes = []
    for seed, q in enumerate(["What is the weather in London?", "Hello, who are you?",
                              "What is the weather in Madrid?", "And in Rome?"]):
        r = api.chat.completions.create(model=MODEL, messages=[SYSTEM, *earlier_calls(), {"role": "user", "content": q}],
                                        tools=[WEATHER], temperature=0.7, seed=seed, max_tokens=100,
                                        logit_bias=NOT_RESPONSE)
        message = r.choices[0].message
        for call in message.tool_calls or []:
            check_call(call, [WEATHER])
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
        else:
            assert message.content
        outcomes.append(bool(message.tool_calls))
    print(f"\nauto: {sum(outcomes)} of {len(outcomes)} answers were calls")
    # Both branches were exercised: a call was made and checked, and prose was allowed.
    assert any(outcomes) and not all(outcomes), outcomes


# ---- billing ---------------------------------------------------------------------------------------


def test_tool_and_json_tokens_are_billed_as_output(server):
    """Embedded server: the usage record counts the call's tokens as output, like any text."""
    admin_env = {"TOLLGATE_ADMIN_TOKEN": "structured-admin"}
    srv = start_server(admin_env)
    try:
        c = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                      temperature=0, max_tokens=100)
        rid = r.id.removeprefix("chatcmpl-")
        headers = {"Authorization": "Bearer structured-admin"}
        for _ in range(600):  # a 30 s guard against a hang: the ledger writes in batches
            records = httpx.get(f"http://{srv.addr}/admin/v1/usage/records?limit=100", headers=headers).json()["data"]
            mine = [x for x in records if x["id"] == rid]
            if mine:
                break
            threading.Event().wait(0.05)
        assert len(mine) == 1
        assert mine[0]["output_tokens"] == r.usage.completion_tokens
        assert mine[0]["input_tokens"] == r.usage.prompt_tokens
        assert mine[0]["finish_reason"] == "tool_calls"
    finally:
        assert stop_server(srv) == 0


# ---- the Llama 3.1+ call syntax --------------------------------------------------------------------

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tollgate"
LLAMA31_TEMPLATE = (
    Path(os.environ.get("TOLLGATE_TEMPLATE_DIR") or CACHE / "llama-templates")
    / "meta-llama-Llama-3.1-8B-Instruct.jinja"
)


@pytest.fixture(scope="module")
def llama3_api():
    """The development model served with Meta's Llama 3.1 chat template (`backend.chat_template`):
    the template renders the tools itself and asks for `{"name": ..., "parameters": ...}`, so
    calls are constrained and parsed in that syntax. A Hermes-shaped call would not parse as
    one, so every `tool_calls` below proves the Llama 3 path end to end."""
    assert LLAMA31_TEMPLATE.exists(), f"{LLAMA31_TEMPLATE} missing: run scripts/fetch-vocabs.sh"
    config = write_config(
        "tollgate-llama3-template-",
        f'[models."{MODEL}"]\n'
        f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
        f'backend = {{ type = "local", chat_template = "{LLAMA31_TEMPLATE}" }}\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n',
    )
    srv = start_server(None, ["--config", config])
    yield OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    assert stop_server(srv) == 0


def test_llama3_syntax_forced_calls_loop_and_stream(llama3_api):
    messages = list(ASK)
    r = llama3_api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=100)
    calls = r.choices[0].message.tool_calls
    assert calls and len(calls) == 1, r.choices[0].message  # Meta's templates take one call per turn
    check_call(calls[0], [WEATHER])
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    # The template wrote the tools into the prompt (with SmolLM's vocabulary its markup is text).
    assert r.usage.prompt_tokens > 150

    parts = list(llama3_api.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=100, stream=True))
    deltas = [p for c in parts if c.choices for p in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len([d for d in deltas if d.function.arguments]) > 1  # arguments stream in pieces
    assert "".join(d.function.arguments or "" for d in deltas) == calls[0].function.arguments

    # The loop: the template renders the assistant's call and the tool's answer itself.
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": weather(calls[0].function.arguments)})
    r = llama3_api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=40)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls

    named = llama3_api.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], temperature=0.8, seed=3, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    check_call(named.choices[0].message.tool_calls[0], [WEATHER])


def test_llama3_syntax_auto_constrains_a_call_that_opens_the_answer(llama3_api):
    # With the earlier turns about half of the sampled answers to a weather question are calls
    # (2 of 4 for each city on the machine this was written on): twelve tries, then prose.
    calls = 0
    asks = [(q, seed) for q in ("What is the weather in London?", "What is the weather in Madrid?")
            for seed in range(6)] + [("Hello, who are you?", 0), ("And in Rome?", 1)]
    for q, seed in asks:
        r = llama3_api.chat.completions.create(model=MODEL, messages=[SYSTEM, *earlier_calls(), {"role": "user", "content": q}],
                                               tools=[WEATHER], temperature=0.7, seed=seed, max_tokens=100)
        message = r.choices[0].message
        for call in message.tool_calls or []:
            check_call(call, [WEATHER])
            calls += 1
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
        else:
            # Prose never starts with a brace: an answer that opens with one is a call.
            assert message.content and not message.content.lstrip().startswith("{")
    print(f"\nllama 3 auto: {calls} of {len(asks)} answers were calls")
    assert calls >= 1, "no answer was a call: the constraint on a call was never exercised"
