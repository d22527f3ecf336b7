"""`Idempotency-Key` against the real server and model, with the OpenAI SDK as the client: a
repeat replays the first result (a stream replays its events), creates no second usage record
and no second charge; another body under the same key is a 409; a repeat while the first runs
is a 409 to retry; the first request runs to completion even when its client hangs up."""

import json
import os
import threading
import time
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, admin_call, customer_keys, start_server, stop_server

ADMIN = "idem-admin"
MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def srv():
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN})
    yield s
    assert stop_server(s) == 0


def admin(srv, method, path, body=None, params=None):
    return admin_call(srv, ADMIN, method, path, body, params)


@pytest.fixture(scope="module")
def keys(srv):
    return customer_keys(srv, ADMIN, ("idem-a", "idem-b"))


def sdk(srv, key):
    return OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def raw(srv, key, path, body, idem=None, **kw):
    headers = {"Authorization": f"Bearer {key}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return httpx.post(f"{srv.base_url}{path}", json=body, headers=headers, timeout=120, **kw)


BARRIERS = set()  # ids of the requests `records` sends to know the ledger has caught up


def all_records(srv, customer):
    out, cursor = [], None
    while True:
        params = {"limit": 1000, **({"after": cursor} if cursor else {})}
        page = admin(srv, "GET", "/usage/records", params=params)
        out += [r for r in page["data"] if r["customer_id"] == customer]
        if not page["data"]:
            return out
        cursor = page["next_cursor"]


def records(srv, customer, keys):
    """The customer's usage records in the database, every request finished before the call
    included: a barrier request is sent last and waited for (the ledger writes a gateway's
    records in the order they were made), instead of sleeping and hoping the writes are in."""
    barrier = raw(srv, keys[customer], "/chat/completions",
                  {"model": MODEL, "messages": MESSAGES, "max_tokens": 1})
    assert barrier.status_code == 200, barrier.text
    BARRIERS.add(barrier.headers["x-request-id"])
    deadline = time.time() + 120
    while True:
        out = all_records(srv, customer)
        if any(r["id"] == barrier.headers["x-request-id"] for r in out):
            return [r for r in out if r["id"] not in BARRIERS]
        assert time.time() < deadline, "the ledger never wrote the barrier request's record"
        time.sleep(0.05)


def end_tokens():
    """Token ids that end a turn in the development model (banned to make a stream long)."""
    import gguf

    path = os.environ.get("TOLLGATE_TEST_MODEL") or ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    vocabulary = [bytes(field.parts[i]).decode() for i in field.data]
    return {str(vocabulary.index(t)): -100 for t in ("<|im_end|>", "<|endoftext|>")}


def key():
    return f"test-{uuid.uuid4()}"


def test_a_repeat_replays_the_first_answer_and_is_billed_once(srv, keys):
    client = sdk(srv, keys["idem-a"])
    k = key()
    before = len(records(srv, "idem-a", keys))
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=None,
        extra_headers={"Idempotency-Key": k},
    )
    # At temperature 1 a second run would most likely differ: the repeat is the stored answer.
    second = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=None,
        extra_headers={"Idempotency-Key": k},
    )
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["original-request-id"] == first.headers["x-request-id"]
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    a, b = first.parse(), second.parse()
    assert a.model_dump() == b.model_dump()
    mine = records(srv, "idem-a", keys)
    assert len(mine) == before + 1
    record = next(r for r in mine if r["id"] == first.headers["x-request-id"])
    assert record["idempotency_key"] == k
    assert record["output_tokens"] == a.usage.completion_tokens


def test_a_streamed_repeat_replays_the_same_events(srv, keys):
    k = key()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}}
    first = raw(srv, keys["idem-a"], "/chat/completions", body, idem=k)
    second = raw(srv, keys["idem-a"], "/chat/completions", body, idem=k)
    assert first.status_code == second.status_code == 200
    assert second.headers["content-type"].startswith("text/event-stream")
    events = lambda r: [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events(first) == events(second)
    assert events(first)[-1] == "data: [DONE]"
    usage = json.loads(events(first)[-2][6:])["usage"]
    assert usage["completion_tokens"] > 0
    ids = [r["id"] for r in records(srv, "idem-a", keys) if r["idempotency_key"] == k]
    assert ids == [first.headers["x-request-id"]]


def test_responses_and_completions_replay_too(srv, keys):
    client = sdk(srv, keys["idem-a"])
    k = key()
    r1 = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=12,
                                 extra_headers={"Idempotency-Key": k})
    r2 = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=12,
                                 extra_headers={"Idempotency-Key": k})
    assert r1.id == r2.id and r1.output_text == r2.output_text
    k2 = key()
    c1 = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8,
                                   extra_headers={"Idempotency-Key": k2})
    c2 = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8,
                                   extra_headers={"Idempotency-Key": k2})
    assert c1.id == c2.id and c1.choices[0].text == c2.choices[0].text
    mine = records(srv, "idem-a", keys)
    assert len([r for r in mine if r["idempotency_key"] == k]) == 1
    assert len([r for r in mine if r["idempotency_key"] == k2]) == 1
    assert next(r for r in mine if r["idempotency_key"] == k)["endpoint"] == "/v1/responses"


def test_another_body_under_the_same_key_is_a_409(srv, keys):
    k = key()
    ok = raw(srv, keys["idem-a"], "/chat/completions",
             {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}, idem=k)
    assert ok.status_code == 200
    other = raw(srv, keys["idem-a"], "/chat/completions",
                {"model": MODEL, "messages": MESSAGES, "max_tokens": 5}, idem=k)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.headers["x-should-retry"] == "false"
    # The same body on another route is another request too.
    other_route = raw(srv, keys["idem-a"], "/completions",
                      {"model": MODEL, "prompt": "hi", "max_tokens": 4}, idem=k)
    assert other_route.status_code == 409
    # Through the SDK it is a ConflictError, not retried.
    with pytest.raises(openai.ConflictError):
        sdk(srv, keys["idem-a"]).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, extra_headers={"Idempotency-Key": k})


def test_keys_are_per_customer(srv, keys):
    k = key()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
    a = raw(srv, keys["idem-a"], "/chat/completions", body, idem=k)
    b = raw(srv, keys["idem-b"], "/chat/completions", body, idem=k)
    assert a.status_code == b.status_code == 200
    assert "idempotent-replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]


def test_a_repeat_while_running_is_a_409_to_retry_then_the_replay(srv, keys):
    k = key()
    # Long by construction: the end of turn is banned, so it runs to max_tokens.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, "logit_bias": end_tokens()}
    first = {}
    streaming = threading.Event()

    def run_first():
        headers = {"Authorization": f"Bearer {keys['idem-a']}", "Idempotency-Key": k}
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, headers=headers,
                          timeout=120) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if '"content"' in line:
                    streaming.set()
            first["events"] = [line for line in lines if line.startswith("data: ")]

    t = threading.Thread(target=run_first)
    t.start()
    # Not a guess at how long it takes to start: its first token has streamed.
    assert streaming.wait(120), "the first request never streamed"
    busy = raw(srv, keys["idem-a"], "/chat/completions", body, idem=k)
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "idempotency_key_in_progress"
    assert busy.headers["retry-after"] == "1"
    assert busy.headers["x-should-retry"] == "true"
    t.join()
    assert "events" in first, "the first request's stream did not complete"
    assert first["events"][-1] == "data: [DONE]"
    assert json.loads(first["events"][-2][6:])["usage"]["completion_tokens"] == 400
    again = raw(srv, keys["idem-a"], "/chat/completions", body, idem=k)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert [line for line in again.text.splitlines() if line.startswith("data: ")] == first["events"]


def test_a_client_that_hangs_up_gets_the_whole_answer_on_retry_billed_once(srv, keys):
    """The first request runs to completion without its client; the retry (which the SDK
    makes on 409 in-progress) receives the full stream, and there is one completed record."""
    k = key()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {keys['idem-a']}", "Idempotency-Key": k}
    with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, headers=headers,
                      timeout=120) as r:
        first_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            if '"content"' in line:
                break  # hang up after the first content chunk
    retrying = OpenAI(base_url=srv.base_url, api_key=keys["idem-a"], max_retries=10, timeout=120)
    stream = retrying.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, stream=True, temperature=0,
        stream_options={"include_usage": True}, extra_headers={"Idempotency-Key": k},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 1
    # The replay is the first request's stream: its id.
    assert chunks[0].id == f"chatcmpl-{first_id}"
    mine = [r for r in records(srv, "idem-a", keys) if r["idempotency_key"] == k]
    assert len(mine) == 1 and mine[0]["status"] == "completed", mine
    assert mine[0]["output_tokens"] == usage.completion_tokens


def test_failed_requests_keep_nothing_and_bad_keys_are_400(srv, keys):
    k = key()
    bad = {"model": MODEL, "messages": MESSAGES, "temperature": 7}
    for _ in range(2):
        r = raw(srv, keys["idem-a"], "/chat/completions", bad, idem=k)
        assert r.status_code == 400 and "idempotent-replayed" not in r.headers
    # The key is free: a corrected body under it is not "reused".
    r = raw(srv, keys["idem-a"], "/chat/completions",
            {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}, idem=k)
    assert r.status_code == 200, r.text
    for bad_key in ["x" * 256, ""]:
        r = raw(srv, keys["idem-a"], "/chat/completions",
                {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}, idem=bad_key)
        assert r.status_code == 400, (bad_key, r.text)
        err = r.json()["error"]
        assert err["param"] == "Idempotency-Key" and err["type"] == "invalid_request_error"
