"""Batches run, with the official OpenAI SDK: every line of a batch runs once through its endpoint
at the `batch` tier, its output (or error) appears once in the batch's files, and its usage record
(tier `batch`, naming the batch) is written once; a cancelled batch finishes the lines in flight and
bills only those; a batch that outruns its customer's budget fails its remaining lines with
`insufficient_quota` and never spends past the budget. On a SQLite ledger, and on PostgreSQL. A
gateway killed mid-batch and restarted on its ledger loses no line and bills none twice."""

import json
import os
import re
import sqlite3
import tempfile
import time
from decimal import Decimal

import httpx
import pytest
from openai import OpenAI

from conftest import NO_END, ROOT, admin_call, ledger_args, start_server, stop_server, write_config
from test_batches import CHAT, MODEL, jsonl, line, validated

ADMIN = "batch-runs-admin"
#: Lines one replica runs at once: few, so that a cancel finds lines not started yet.
CONCURRENCY = 2


def config() -> str:
    """models.toml with `batch_concurrency` set (the model's path made absolute)."""
    text = (ROOT / "models.toml").read_text()
    text = text.replace('path = "models/', f'path = "{ROOT}/models/')
    text = text.replace("[server]\n", f"[server]\nbatch_concurrency = {CONCURRENCY}\n", 1)
    return write_config("tollgate-batch-runs-", text)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request):
    """A server on a SQLite ledger, then on PostgreSQL (TOLLGATE_TEST_POSTGRES=1)."""
    args = ["--config", config()] + ledger_args(request.param, "tollgate-batch-runs-")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    yield s
    assert stop_server(s) == 0, "".join(s.log[-40:])


def client_of(srv, customer, **fields) -> OpenAI:
    admin_call(srv, ADMIN, "POST", "/customers", {"id": customer, "name": customer, **fields})
    key = admin_call(srv, ADMIN, "POST", f"/customers/{customer}/keys", {"name": "k"})["key"]
    return OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def chat(custom_id, max_tokens=4, **body):
    return line(custom_id, {"model": MODEL, "messages": [{"role": "user", "content": f"Say {custom_id}."}],
                            "max_tokens": max_tokens, "temperature": 0, **body})


def ended(client, batch_id, deadline=900):
    """The batch once it has ended (polled; the deadline only guards against a hang)."""
    end = time.time() + deadline
    while time.time() < end:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "expired", "cancelled", "failed"):
            return b
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {b.status}: {b.request_counts}")


def file_lines(client, file_id):
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def records(srv, customer, count, deadline=120):
    """The customer's usage records once `count` are written (the ledger writes them in the
    background), checked to stay at `count`."""
    end = time.time() + deadline
    while True:
        page = admin_call(srv, ADMIN, "GET", "/usage/records", params={"customer_id": customer, "limit": 1000})
        data = page["data"]
        if len(data) >= count or time.time() > end:
            assert len(data) == count, data
            return data
        time.sleep(0.2)


def run_batch(client, lines):
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    return validated(client, batch.id)


def test_every_line_runs_once_at_the_batch_tier_and_is_billed_once(srv):
    client = client_of(srv, "runs-a")
    ids = [f"r{i}" for i in range(7)]
    started = run_batch(client, [chat(i) for i in ids])
    assert started.status in ("in_progress", "finalizing", "completed"), started
    batch = ended(client, started.id)
    assert batch.status == "completed" and batch.completed_at is not None and batch.finalizing_at is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 7, 0)
    assert batch.error_file_id is None
    out = file_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(ids)
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200, o
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["service_tier"] == "batch", body
        assert o["id"].startswith("batch_req_")
    meta = client.files.retrieve(batch.output_file_id)
    assert meta.purpose == "batch_output"
    usage = batch.to_dict()["usage"]
    assert usage["input_tokens"] == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)
    assert usage["output_tokens"] == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)

    recs = records(srv, "runs-a", 7)
    assert sorted(r["id"] for r in recs) == sorted(o["response"]["request_id"] for o in out)
    # Half the default prices of models.toml's smollm2-135m (0.05 and 0.10 per million).
    for r in recs:
        assert (r["service_tier"], r["batch_id"], r["status"]) == ("batch", batch.id, "completed"), r
        assert (Decimal(r["input_price_per_mtok"]), Decimal(r["output_price_per_mtok"])) == (Decimal("0.025"), Decimal("0.05"))

    finished = r'tollgate_batch_lines_finished_total\{model="smollm2-135m",state="completed"\} (\d+)'
    queued = r'tollgate_batch_lines\{model="smollm2-135m",state="queued"\} (\d+)'
    end = time.time() + 60
    while True:
        # The runner refreshes the queued and running gauges on its next pass.
        metrics = httpx.get(f"http://{srv.addr}/metrics", timeout=30).text
        done, waiting = re.search(finished, metrics), re.search(queued, metrics)
        if done and waiting and int(done.group(1)) >= 7 and waiting.group(1) == "0" or time.time() > end:
            break
        time.sleep(0.2)
    assert done and int(done.group(1)) == 7, metrics[-3000:]
    assert waiting and waiting.group(1) == "0", metrics[-3000:]


def test_a_cancelled_batch_finishes_its_running_lines_and_bills_only_those(srv):
    client = client_of(srv, "runs-cancel")
    # Long lines (the end tokens banned): at most CONCURRENCY run at a time, so most are
    # still queued when the cancel arrives.
    ids = [f"c{i}" for i in range(12 * CONCURRENCY)]
    started = run_batch(client, [chat(i, max_tokens=256, logit_bias=NO_END) for i in ids])
    cancelled = client.batches.cancel(started.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    batch = ended(client, started.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    out = file_lines(client, batch.output_file_id)
    errors = file_lines(client, batch.error_file_id)
    ran = [o for o in out] + [e for e in errors if e["response"] is not None]
    skipped = [e for e in errors if e["response"] is None]
    assert sorted(x["custom_id"] for x in out + errors) == sorted(ids)
    assert skipped, len(ran)
    assert all(e["error"]["code"] == "batch_cancelled" for e in skipped)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(errors) - len(skipped))
    recs = records(srv, "runs-cancel", len(ran))
    assert sorted(r["id"] for r in recs) == sorted(x["response"]["request_id"] for x in ran)


def test_a_batch_past_its_budget_fails_the_rest_with_insufficient_quota(srv):
    # Each line may cost at most about 2e-6 USD at the batch price: the budget holds two or three.
    budget = "0.000005"
    client = client_of(srv, "runs-budget", budget_usd=budget)
    ids = [f"b{i}" for i in range(10)]
    batch = ended(client, run_batch(client, [chat(i, max_tokens=16) for i in ids]).id)
    assert batch.status == "completed"
    out = file_lines(client, batch.output_file_id)
    errors = file_lines(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in out + errors) == sorted(ids)
    assert out and errors, (len(out), len(errors))
    for e in errors:
        assert e["error"]["code"] == "insufficient_quota", e
        assert e["response"]["status_code"] == 429
    recs = records(srv, "runs-budget", len(out))
    assert sum(Decimal(r["cost_usd"]) for r in recs) <= Decimal(budget)


def test_a_gateway_killed_mid_batch_loses_no_line_and_bills_none_twice():
    """SIGKILL with lines in flight, then a restart on the same ledger: the lines it held run
    again once their lease lapses; every line is in the output once and billed once."""
    db = os.path.join(tempfile.mkdtemp(prefix="tollgate-batch-kill-"), "ledger.db")
    path = config()
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[server]\n", "[server]\nbatch_lease_secs = 3\n", 1))
    args = ["--config", path, "--database", db]
    first = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        client = client_of(first, "runs-kill")
        # Long lines (the end tokens banned), CONCURRENCY at a time: when the first ends, the
        # next ones are running and most have not started.
        ids = [f"k{i}" for i in range(10 * CONCURRENCY)]
        batch_id = run_batch(client, [chat(i, max_tokens=64, logit_bias=NO_END) for i in ids]).id
        end = time.time() + 600
        while client.batches.retrieve(batch_id).request_counts.completed == 0:
            assert time.time() < end, "no line ended"
            time.sleep(0.05)
    finally:
        first.proc.kill()
        first.proc.wait(timeout=60)
    with sqlite3.connect(db) as conn:
        ((held,),) = conn.execute("SELECT COUNT(*) FROM batch_lines WHERE state = 'running'").fetchall()
    assert held > 0, "no line was in flight when the gateway was killed"
    second = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        key = client.api_key
        client = OpenAI(base_url=second.base_url, api_key=key, max_retries=0, timeout=120)
        batch = ended(client, batch_id)
        assert batch.status == "completed", batch
        assert batch.request_counts.total == batch.request_counts.completed == len(ids)
        out = file_lines(client, batch.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(ids)
        assert batch.error_file_id is None
        recs = records(second, "runs-kill", len(ids))
        assert sorted(r["id"] for r in recs) == sorted(o["response"]["request_id"] for o in out)
        assert all(r["batch_id"] == batch_id and r["service_tier"] == "batch" for r in recs)
        with sqlite3.connect(db) as conn:
            ((again,),) = conn.execute("SELECT COUNT(*) FROM batch_lines WHERE attempts > 1").fetchall()
        assert again >= held, (again, held)
    finally:
        assert stop_server(second) == 0, "".join(second.log[-40:])
