"""The official OpenAI Python SDK, unchanged, against the real server and the real model."""

import concurrent.futures
import os
import pathlib
import time

import httpx
import openai
import pytest

from conftest import API_KEY, NO_END

ROOT = pathlib.Path(__file__).resolve().parents[2]

FRANCE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models_list(client, model):
    ids = [m.id for m in client.models.list().data]
    assert model in ids
    assert client.models.retrieve(model).id == model


def test_chat_greedy_answer(client, model):
    r = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=32)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-")


def test_stream_matches_non_streamed_and_reports_usage(client, model):
    full = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model=model,
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stop_string_is_not_emitted(client, model):
    r = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=32, stop=["Paris"]
    )
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=32, stop=["Paris"], stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert streamed == r.choices[0].message.content


def test_max_tokens_gives_length(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0,
        max_completion_tokens=5,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_seed_reproducible(client, model):
    args = dict(model=model, messages=FRANCE, temperature=1.0, max_tokens=20, seed=1234)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b
    others = {
        client.chat.completions.create(**dict(args, seed=s)).choices[0].message.content
        for s in (1, 2, 3)
    }
    assert len(others | {a}) > 1, "different seeds should not all give the same text"


def test_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


def vocabulary():
    """The development model's tokens, by id."""
    import gguf

    path = os.environ.get("TOLLGATE_TEST_MODEL") or ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def test_logit_bias(client, model):
    """-100 bans a token, +100 forces it; the keys are token ids, checked against the vocabulary."""
    base = dict(model=model, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True)
    r = client.chat.completions.create(**base)
    first = r.choices[0].logprobs.content[0]
    assert first.token == "The", first.token
    the = vocabulary().index("The")
    banned = client.chat.completions.create(**base, logit_bias={str(the): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    forced = client.chat.completions.create(**dict(base, max_tokens=3), logit_bias={"1000": 100})
    tokens = [t.token for t in forced.choices[0].logprobs.content]
    assert len(tokens) == 3 and len(set(tokens)) == 1, tokens
    # Banning the end of turn runs to max_tokens.
    end = vocabulary().index("<|im_end|>")
    long = client.chat.completions.create(**dict(base, max_tokens=40), logit_bias={str(end): -100})
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 40
    for bias, needle in [({"abc": 1}, "token id"), ({"5": 101}, "between -100 and 100"),
                         ({"49152": 1}, "vocabulary"), ({str(i): 1 for i in range(301)}, "at most 300")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**base, logit_bias=bias)
        assert e.value.param == "logit_bias", bias
        assert needle in e.value.message, e.value.message


def test_n_choices(client, model):
    r = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0.8, max_tokens=8, n=2, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1]


def test_completions_endpoint(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert len(r.choices[0].text) > 0
    assert r.usage.completion_tokens <= 5


def test_errors(server, client, model):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=FRANCE)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=FRANCE, temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=FRANCE, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=FRANCE, max_tokens=100_000)
    assert "context" in e.value.message


def test_arguments_the_server_cannot_honour_are_refused(client, model):
    """An argument the server does not implement is a 400 naming it, never ignored."""
    for kwargs, param in [
        ({"extra_body": {"ignore_eos": True}}, "ignore_eos"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"store": True}, "store"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=FRANCE, max_tokens=2, **kwargs)
        assert e.value.param == param, kwargs
        assert "Unrecognized request argument" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Paris is", max_tokens=2, extra_body={"min_p": 0.1})
    assert e.value.param == "min_p"
    # Arguments that ask for what the server does anyway, and nulls, are accepted.
    r = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=2, store=False,
                                       service_tier="auto", logit_bias={}, extra_body={"ignore_eos": None})
    assert r.choices[0].message.content is not None


def test_request_id_header(server, model):
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": model, "messages": FRANCE, "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200
    assert len(r.headers["x-request-id"]) == 36
    r = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json", timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "x-request-id" in r.headers


def test_concurrent_streams(client, model):
    def one(i):
        s = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(s)
        return chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(0 < n <= 16 for n in results)


def decoded_tokens(server):
    """The engine's decode counter, summed over models."""
    metrics = httpx.get(f"http://{server.addr}/metrics", timeout=10).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
               if l.startswith("tollgate_decode_tokens_total{"))


def test_disconnect_mid_stream_then_normal_request(server, client, model):
    before = decoded_tokens(server)
    # 4,000 tokens with the end tokens banned: far more than the engine makes before it notices
    # the hang-up, whatever the machine's speed, so the count below tells a stop from a run to
    # the end.
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
        temperature=0,
        max_tokens=4000,
        logit_bias=NO_END,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # The engine stops generating for a client that went away: no sequence keeps running, and it
    # stopped well short of max_tokens. The deadline only guards against a hang.
    deadline = time.time() + 60
    running = None
    while time.time() < deadline:
        metrics = httpx.get(f"http://{server.addr}/metrics", timeout=10).text
        running = [l for l in metrics.splitlines() if l.startswith("tollgate_running_sequences{")]
        if running and all(l.endswith(" 0") for l in running):
            break
        time.sleep(0.1)
    assert running and all(l.endswith(" 0") for l in running), running
    # The counter counts decode rows (a sequence's place in a step), not tokens: with speculative
    # decoding one row may give up to nine tokens, so a run to the end would take at least
    # 4000 / 9 = 444 rows, and a stop shows as fewer than 400. The client read tokens past the
    # first (the prompt's pass gives that one), so at least one row was decoded.
    decoded = decoded_tokens(server) - before
    assert 1 <= decoded < 400, f"the engine decoded {decoded} rows for a stream abandoned after 3 chunks"
    r = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
