"""OpenAI's Predicted Outputs (`prediction` on chat completions) with the official SDK against
the real server and model: the answer is the one without a prediction, the prediction's tokens
are counted accepted and rejected in `usage.completion_tokens_details` (also on the stream's
usage chunk), carried on the usage record, priced at `price.rejected_prediction_per_mtok` and
shown on the invoice and the exports; through a `tollgate worker` too; refused with a 400
naming the field where it cannot be honoured."""

import contextlib
import csv
import io
import json
import os
import subprocess
import tempfile

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, free_port, routed_model, start_server, start_worker, stop_server

ADMIN = "admin-test-token"
KEY = "sk-test-python"
MODEL = "smollm2-135m"
# Prices of the catalogue below, in nano-USD per token.
IN_NANO, OUT_NANO, REJECTED_NANO = 50, 100, 300
CODE = """def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


for i in range(10):
    print(i, fibonacci(i))"""
COPY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": f"Repeat this code exactly, nothing else:\n{CODE}"},
]
UNRELATED = " Lighthouses guard the harbour while seven violet zebras debate quantum poetry."


def write(text: str) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="tollgate-predict-"), "models.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def config() -> str:
    return write(
        "[server]\n"
        "max_n = 8\n\n"
        f'[models."{MODEL}"]\n'
        f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
        'backend = { type = "local", device = "cpu", weights = "auto" }\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10", rejected_prediction_per_mtok = "0.30" }\n\n'
        # An OpenAI-compatible upstream not said to take `prediction` (nothing listens there:
        # the refusal comes before any connection).
        '[models."plain-upstream"]\n'
        'backend = { type = "http", urls = ["http://127.0.0.1:9"] }\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request):
    """The server on the catalogue above, its ledger in SQLite or in PostgreSQL."""
    if request.param == "sqlite":
        db = os.path.join(tempfile.mkdtemp(prefix="tollgate-predict-db-"), "ledger.db")
    elif os.environ.get("TOLLGATE_TEST_POSTGRES"):
        reset = [str(ROOT / "scripts" / "postgres.sh"), "reset"]
        db = subprocess.run(reset, capture_output=True, text=True, check=True).stdout.strip()
    else:
        pytest.skip("needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--config", config(), "--database", db])
    srv.db = db
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)


def create(client, model=MODEL, **kw):
    """A greedy chat completion of the copy task; the answer and its request id."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=COPY, max_tokens=48, temperature=0, **kw
    )
    return raw.parse(), raw.headers["x-request-id"]


def counts(r):
    d = r.usage.completion_tokens_details
    return d.accepted_prediction_tokens, d.rejected_prediction_tokens


def records(srv) -> dict:
    r = httpx.get(f"http://{srv.addr}/admin/v1/usage/records", params={"limit": 500},
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {rec["id"]: rec for rec in r.json()["data"]}


def nano(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])


def test_a_prediction_never_changes_the_answer_and_is_counted_and_billed(stack, client):
    plain, plain_id = create(client)
    text = plain.choices[0].message.content
    assert text and plain.usage.completion_tokens > 4, plain
    assert counts(plain) == (0, 0)

    # The answer itself as the prediction: kept where verified.
    same, same_id = create(client, prediction={"type": "content", "content": text})
    assert same.choices[0].message.content == text
    assert same.usage.completion_tokens == plain.usage.completion_tokens
    accepted, rejected = counts(same)
    assert 0 < accepted <= same.usage.completion_tokens, same.usage

    # The answer's first words, then something else: the rest is verified and thrown away.
    # (A prediction is drafted where the output follows it, so it must begin like the answer.)
    off = text[:12] + UNRELATED
    other, other_id = create(client, prediction={"type": "content", "content": [{"type": "text", "text": off}]})
    assert other.choices[0].message.content == text
    assert counts(other)[1] > 0, other.usage

    # Streamed: the same text, and the counts on the final usage chunk.
    stream = client.chat.completions.create(
        model=MODEL, messages=COPY, max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True}, prediction={"type": "content", "content": off},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and counts(chunks[-1]) == counts(other)

    # The records carry the counts; a rejected token costs the rejected prediction price
    # beside the output, the whole rounded once.
    recs = records(stack)
    for rid, r in [(plain_id, plain), (same_id, same), (other_id, other)]:
        rec = recs[rid]
        a, rj = counts(r)
        assert (rec["accepted_prediction_tokens"], rec["rejected_prediction_tokens"]) == (a, rj)
        assert rec["output_tokens"] == r.usage.completion_tokens
        assert rec["rejected_prediction_price_per_mtok"] == "0.30"
        fresh = rec["input_tokens"] - rec["cached_input_tokens"]
        cached_nano = nano(rec["cached_input_cost_usd"])
        expected = fresh * IN_NANO + cached_nano + rec["output_tokens"] * OUT_NANO + rj * REJECTED_NANO
        assert nano(rec["cost_usd"]) == expected, rec
        assert nano(rec["rejected_prediction_cost_usd"]) == rj * REJECTED_NANO

    # The invoice has a line for them, and its lines add up to the records.
    mine = [rec for rec in recs.values() if rec["customer_id"] == recs[plain_id]["customer_id"]]
    inv = httpx.get(f"http://{stack.addr}/admin/v1/invoices/{recs[plain_id]['customer_id']}",
                    headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
    lines = [li for li in inv["line_items"] if li["kind"] == "rejected_prediction"]
    assert len(lines) == 1, inv
    assert lines[0]["rejected_prediction_tokens"] == sum(r["rejected_prediction_tokens"] for r in mine)
    assert lines[0]["rejected_prediction_price_per_mtok"] == "0.30"
    assert nano(lines[0]["amount_usd"]) == sum(nano(r["rejected_prediction_cost_usd"]) for r in mine)
    assert nano(inv["total_usd"]) == sum(nano(li["amount_usd"]) for li in inv["line_items"])
    assert nano(inv["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine)

    # The exports: CSV and JSONL alike.
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    export = lambda fmt: subprocess.run(  # noqa: E731
        [binary, "usage", "export", "--format", fmt, "--database", stack.db],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = {row["id"]: row for row in csv.DictReader(io.StringIO(export("csv")))}
    lines = {j["id"]: j for j in map(json.loads, export("jsonl").splitlines())}
    a, rj = counts(other)
    assert (rows[other_id]["accepted_prediction_tokens"], rows[other_id]["rejected_prediction_tokens"]) == (str(a), str(rj))
    assert nano(rows[other_id]["rejected_prediction_cost_usd"]) == rj * REJECTED_NANO
    assert (lines[other_id]["accepted_prediction_tokens"], lines[other_id]["rejected_prediction_tokens"]) == (a, rj)


def test_a_prediction_is_honoured_with_what_openai_refuses_beside_it(client):
    """`n > 1`, `logprobs` and penalties are refused with a prediction by OpenAI; the engine
    verifies a draft position by sampling it as without the draft, so Tollgate honours them."""
    plain, _ = create(client, n=2, logprobs=True, top_logprobs=2, presence_penalty=0.5)
    text = plain.choices[0].message.content
    predicted, _ = create(client, n=2, logprobs=True, top_logprobs=2, presence_penalty=0.5,
                          prediction={"type": "content", "content": text})
    for a, b in zip(plain.choices, predicted.choices):
        assert a.message.content == b.message.content
        assert [t.token for t in a.logprobs.content] == [t.token for t in b.logprobs.content]
        for x, y in zip(a.logprobs.content, b.logprobs.content):
            assert abs(x.logprob - y.logprob) < 1e-3, (x, y)
    assert counts(predicted)[0] > 0


def test_a_prediction_goes_through_a_worker():
    """A gateway whose model is a pool of `tollgate worker`s (`forward_customer`: the
    prediction goes through by default) gets the worker's answer and counts."""
    with contextlib.ExitStack() as cleanup:
        port = free_port()
        worker, _ = start_worker(port, "worker-token")
        cleanup.callback(worker.wait, timeout=60)
        cleanup.callback(worker.terminate)
        config = write(routed_model(MODEL, port, ", forward_customer = true"))
        srv = start_server({"TOLLGATE_WORKER_TOKEN": "worker-token"}, ["--config", config])
        cleanup.callback(lambda: stop_server(srv) == 0 or pytest.fail("the gateway exited badly"))
        client = OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=120)
        # The worker listens before the gateway starts, and a pool's members are in rotation
        # until a probe says otherwise.
        plain, _ = create(client)
        text = plain.choices[0].message.content
        same, _ = create(client, prediction={"type": "content", "content": text})
        assert same.choices[0].message.content == text
        assert counts(same)[0] > 0, same.usage


def test_predictions_it_cannot_honour_are_refused_naming_the_field(client):
    for model, prediction, param in [
        (MODEL, {"type": "file", "content": "x"}, "prediction.type"),
        (MODEL, {"type": "content", "content": [{"type": "image_url", "text": "x"}]}, "prediction.content"),
        ("plain-upstream", {"type": "content", "content": "x"}, "prediction"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            create(client, model=model, prediction=prediction)
        assert e.value.param == param, (model, prediction)
    # Text completions have no `prediction` (as at OpenAI).
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def f():", max_tokens=4,
                                  extra_body={"prediction": {"type": "content", "content": "x"}})
    assert e.value.param == "prediction"
