"""The Batch API's objects with the official OpenAI SDK: create (validated line by line before it
starts), retrieve, list and cancel, OpenAI's lifecycle and shapes; a batch is its customer's. On a
SQLite ledger, and on PostgreSQL. Running lines and cancelling a batch that runs: test_batch_runs.py."""

import io
import json
import time

import openai
import pytest
from openai import OpenAI

from conftest import customer_keys, ledger_args, start_server, stop_server

ADMIN = "batches-admin"
MODEL = "smollm2-135m"
CHAT = "/v1/chat/completions"


def line(custom_id, body=None, method="POST", url=CHAT):
    body = body or {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def jsonl(lines) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request):
    """A server on a SQLite ledger, then on PostgreSQL (TOLLGATE_TEST_POSTGRES=1)."""
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ledger_args(request.param, "tollgate-batches-"))
    yield s
    assert stop_server(s) == 0, "".join(s.log[-40:])


@pytest.fixture(scope="module")
def two(srv):
    keys = customer_keys(srv, ADMIN, ("batch-a", "batch-b"))
    return [OpenAI(base_url=srv.base_url, api_key=keys[c], max_retries=0, timeout=60) for c in ("batch-a", "batch-b")]


def validated(client, batch_id):
    """The batch once its validation is over (it runs after `create` answers)."""
    for _ in range(600):
        b = client.batches.retrieve(batch_id)
        if b.status != "validating":
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still validating")


def test_a_valid_batch_starts_and_is_listed(two):
    a, b = two
    f = a.files.create(file=("in.jsonl", jsonl([line(f"r{i}") for i in range(3)])), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                             metadata={"job": "nightly"})
    assert (batch.object, batch.endpoint, batch.input_file_id, batch.completion_window) == ("batch", CHAT, f.id, "24h")
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    assert batch.expires_at == batch.created_at + 86400
    started = validated(a, batch.id)
    # Its lines start running at once (test_batch_runs.py runs and cancels batches).
    assert started.status in ("in_progress", "finalizing", "completed") and started.in_progress_at >= started.created_at
    assert started.request_counts.total == 3
    assert started.errors is None
    assert batch.id in [x.id for x in a.batches.list()]
    assert batch.id not in [x.id for x in b.batches.list()]
    for call in (lambda: b.batches.retrieve(batch.id), lambda: b.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_every_refused_line_is_reported_with_its_number(two):
    a, _ = two
    lines = [
        line("ok"),
        line("ok"),  # 2: duplicate custom_id
        line("u", url="/v1/completions"),  # 3
        line("s", body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}),  # 4
        line("t", body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}),  # 5
        line("m", method="GET"),  # 6
        line("n", body={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),  # 7
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines) + b'["not", "a", "line"]\n'  # 8
    f = a.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    batch = validated(a, a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at is not None
    errors = {e.line: e for e in batch.errors.data}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8], batch.errors
    assert errors[2].code == "duplicate_custom_id"
    assert errors[3].code == "mismatched_url"
    assert errors[4].param == "body.stream"
    assert errors[5].param == "body.temperature"
    assert errors[6].code == "invalid_method"
    assert "no-such-model" in errors[7].message
    assert errors[8].code == "invalid_json_line"
    with pytest.raises(openai.ConflictError):
        a.batches.cancel(batch.id)


def test_create_refuses_what_it_cannot_run(two):
    a, b = two
    f = a.files.create(file=("in.jsonl", jsonl([line("x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        b.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as e:
        a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="1h")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as e:
        a.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
