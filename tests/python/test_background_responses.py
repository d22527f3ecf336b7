"""Background responses (`background: true` on /v1/responses), with the official OpenAI SDK, on a
SQLite ledger and on PostgreSQL: accepted at once `queued`, run at the tier asked and billed once
(one usage record, whose id is the response's), polled, cancelled, streamed again from any event,
and completed (billed once) by a restarted gateway after the one running it was SIGKILLed; each end is a
webhook event."""

import os
import re
import sqlite3
import subprocess
import tempfile
import time
from decimal import Decimal

import httpx
import openai
import pytest
import standardwebhooks
from openai import OpenAI

from conftest import admin_call, ledger_args, start_server, stop_server
from test_batch_runs import ADMIN, CONCURRENCY, chat, client_of, records, run_batch
from test_batch_runs import ended as batch_ended
from test_batch_runs import config as batch_config
from test_alerts import Receiver, wait
from test_webhooks import events_of

MODEL = "smollm2-135m"
FINAL = ("completed", "failed", "cancelled", "incomplete")


def config(lease_secs=60) -> str:
    """test_batch_runs' models.toml (a few runs at once here) with the runners' lease set."""
    path = batch_config()
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[server]\n", f"[server]\nbatch_lease_secs = {lease_secs}\n", 1))
    return path


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request):
    """A server on a SQLite ledger, then on PostgreSQL (TOLLGATE_TEST_POSTGRES=1)."""
    args = ["--config", config()] + ledger_args(request.param, "tollgate-background-")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    yield s
    assert stop_server(s) == 0, "".join(s.log[-40:])


def ended(client, response_id, deadline=900):
    """The response once it has ended (polled; the deadline only guards against a hang)."""
    end = time.time() + deadline
    while time.time() < end:
        r = client.responses.retrieve(response_id)
        if r.status in FINAL:
            return r
        time.sleep(0.2)
    raise AssertionError(f"response {response_id} still {r.status}")


def record_id(response_id) -> str:
    """The id of the usage record of response `resp_<hex>`: the UUID of its hex."""
    h = response_id.removeprefix("resp_")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def first_output(client, response_id):
    """Streams the response's events until its first output text; returns those events."""
    seen = []
    with client.responses.retrieve(response_id, stream=True) as events:
        for e in events:
            seen.append(e)
            if e.type == "response.output_text.delta":
                return seen
    raise AssertionError(f"the response ended without output: {[e.type for e in seen]}")


def long_response(client, tokens=400, **extra):
    """A background response that runs `tokens` tokens by construction: its format asks for far
    more numbers than `tokens` can write (the grammar allows no end before them)."""
    numbers = {"type": "array", "minItems": 60, "maxItems": 60,
               "items": {"type": "integer", "minimum": 10, "maximum": 99}}
    schema = {"type": "object", "properties": {"rows": {**numbers, "items": numbers}},
              "required": ["rows"], "additionalProperties": False}
    return client.responses.create(
        model=MODEL, input="Write numbers.", background=True, max_output_tokens=tokens,
        text={"format": {"type": "json_schema", "name": "numbers", "schema": schema, "strict": True}}, **extra)


def test_a_background_response_runs_at_its_tier_and_is_billed_once(srv):
    client = client_of(srv, "bg-run")
    r = client.responses.create(model=MODEL, input="Say hello.", background=True, service_tier="flex",
                                max_output_tokens=8, temperature=0)
    assert (r.status, r.background, r.service_tier) == ("queued", True, "flex"), r
    assert r.output == [] and r.usage is None
    done = ended(client, r.id)
    assert done.status in ("completed", "incomplete"), done
    assert done.background and done.service_tier == "flex" and done.output_text
    assert done.usage.output_tokens > 0
    (rec,) = records(srv, "bg-run", 1)
    assert rec["id"] == record_id(r.id)
    assert (rec["endpoint"], rec["service_tier"]) == ("/v1/responses", "flex"), rec
    assert (rec["input_tokens"], rec["output_tokens"]) == (done.usage.input_tokens, done.usage.output_tokens)
    # A stored response like any other: it continues a conversation.
    again = client.responses.create(model=MODEL, input="Again.", previous_response_id=r.id, max_output_tokens=4)
    assert again.status in ("completed", "incomplete")


def test_refusals_are_openai_shaped_and_name_the_field(srv):
    client = client_of(srv, "bg-refused")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", background=True, store=False)
    assert e.value.body["param"] == "store", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", background=True, service_tier="scale")
    assert e.value.body["param"] == "service_tier", e.value.body
    plain = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(plain.id)
    assert "background" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        list(client.responses.retrieve(plain.id, stream=True))
    assert e.value.body["param"] == "stream", e.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_0123456789abcdef0123456789abcdef")


def test_a_cancelled_response_stops_and_is_billed_for_what_it_produced(srv):
    client = client_of(srv, "bg-cancel")
    r = long_response(client, tokens=2000)
    first_output(client, r.id)  # running, by construction: 2000 tokens, the first one out
    cancelled = client.responses.cancel(r.id)
    assert (cancelled.id, cancelled.status) == (r.id, "cancelled"), cancelled
    assert client.responses.retrieve(r.id).status == "cancelled"
    # Cancelling it again returns it as it is.
    assert client.responses.cancel(r.id).status == "cancelled"
    (rec,) = records(srv, "bg-cancel", 1)
    assert rec["id"] == record_id(r.id) and rec["status"] == "cancelled", rec
    assert 0 < rec["output_tokens"] < 2000, rec
    # Its stream ends (with the events it stored before it stopped).
    events = list(client.responses.retrieve(r.id, stream=True))
    assert events and events[-1].type not in ("response.completed", "response.incomplete")


def test_its_events_stream_again_from_any_sequence_number(srv):
    client = client_of(srv, "bg-stream")
    with client.responses.create(model=MODEL, input="Say hello.", background=True, stream=True,
                                 max_output_tokens=12, temperature=0) as live:
        seen = list(live)
    kinds = [e.type for e in seen]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    r = seen[-1].response
    assert r.background and r.usage.output_tokens > 0
    everything = list(client.responses.retrieve(r.id, stream=True))
    assert [e.model_dump() for e in everything] == [e.model_dump() for e in seen]
    n = 3
    resumed = list(client.responses.retrieve(r.id, stream=True, starting_after=n))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in seen[n + 1:]]
    assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == r.output_text
    records(srv, "bg-stream", 1)


def test_ends_reach_the_webhook_signed_once_each(srv):
    """`response.completed` and `response.cancelled`, each once, signed with the Standard
    Webhooks headers (the batch events' test checks their retries and OpenAI's SDK)."""
    receiver = Receiver()
    try:
        client = client_of(srv, "bg-hooked")
        r = httpx.put(f"http://{srv.addr}/admin/v1/customers/bg-hooked/alerts", json={"webhook_url": receiver.url},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert r.status_code == 200, r.text
        verifier = standardwebhooks.Webhook(r.json()["webhook_secret"])
        done = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=4)
        assert ended(client, done.id).status in ("completed", "incomplete")
        stopped = long_response(client, tokens=2000)
        first_output(client, stopped.id)
        client.responses.cancel(stopped.id)
        end = {"completed": "response.completed", "incomplete": "response.incomplete"}
        for rid, kind in [(done.id, end[client.responses.retrieve(done.id).status]),
                          (stopped.id, "response.cancelled")]:
            (headers, event), = wait(lambda rid=rid: events_of(receiver, rid), timeout=120, what=kind)
            assert (event["type"], event["data"]) == (kind, {"id": rid}), event
            raw = next(b for h, b in receiver.accepted() if h["webhook-id"] == event["id"])
            verifier.verify(raw, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        # Ending again adds nothing: a second cancel returns the response as it is.
        assert client.responses.cancel(stopped.id).status == "cancelled"
        assert client.responses.cancel(done.id).status == client.responses.retrieve(done.id).status
    finally:
        receiver.close()


def test_a_run_that_cannot_start_fails_once_with_its_reason_and_the_webhook_is_told(srv):
    """A queued response whose API key was revoked before its turn ends `failed`, with the
    refusal's code, unbilled; `response.failed` reaches the webhook once, signed."""
    receiver = Receiver()
    busy = client_of(srv, "bg-busy")
    holders = []
    try:
        admin_call(srv, ADMIN, "POST", "/customers", {"id": "bg-broke", "name": "bg-broke"})
        key = admin_call(srv, ADMIN, "POST", "/customers/bg-broke/keys", {"name": "k"})
        client = OpenAI(base_url=srv.base_url, api_key=key["key"], max_retries=0, timeout=120)
        r = httpx.put(f"http://{srv.addr}/admin/v1/customers/bg-broke/alerts", json={"webhook_url": receiver.url},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert r.status_code == 200, r.text
        verifier = standardwebhooks.Webhook(r.json()["webhook_secret"])
        # Every run slot taken by long responses (running, by construction): the next one waits.
        holders = [long_response(busy, tokens=2000) for _ in range(CONCURRENCY)]
        for h in holders:
            first_output(busy, h.id)
        victim = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=16)
        assert client.responses.retrieve(victim.id).status == "queued"
        # The key that asked is revoked before its turn.
        admin_call(srv, ADMIN, "DELETE", f"/keys/{key['id']}")
        for h in holders:
            busy.responses.cancel(h.id)
        # Read back with another key of the customer's: the revoked one reads nothing.
        again = admin_call(srv, ADMIN, "POST", "/customers/bg-broke/keys", {"name": "k2"})
        client = OpenAI(base_url=srv.base_url, api_key=again["key"], max_retries=0, timeout=120)
        done = ended(client, victim.id)
        assert done.status == "failed", done
        assert done.error.code == "invalid_api_key" and "revoked" in done.error.message, done.error
        assert done.output == []
        (headers, event), = wait(lambda: events_of(receiver, victim.id), timeout=120, what="response.failed")
        assert (event["type"], event["data"]) == ("response.failed", {"id": victim.id}), event
        raw = next(b for h, b in receiver.accepted() if h["webhook-id"] == event["id"])
        verifier.verify(raw, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        assert client.responses.retrieve(victim.id).status == "failed"
        records(srv, "bg-broke", 0)
    finally:
        for h in holders:
            busy.responses.cancel(h.id)
        receiver.close()


def console_row(html, object_id):
    """The cells of the console table row that names `object_id`."""
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", html, re.S) if object_id in r)
    return re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)


def usd(records):
    """What `records` cost, as the console shows money (six decimals)."""
    nano = sum(int(Decimal(x["cost_usd"]) * 10**9) for x in records)
    return f"${nano // 10**9}.{nano % 10**9:09d}"[:-3]


def test_the_console_lists_a_customers_batches_and_background_responses(srv):
    client = client_of(srv, "bg-console")
    r = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=4)
    done = ended(client, r.id)
    batch = batch_ended(client, run_batch(client, [chat("c1"), chat("c2"), chat("c3")]).id)
    assert batch.status == "completed", batch
    recs = records(srv, "bg-console", 4)
    login = httpx.post(f"http://{srv.addr}/console/login", data={"token": ADMIN}, timeout=30)
    assert login.status_code == 303, login.text
    cookie = login.headers["set-cookie"].split(";")[0]
    page = httpx.get(f"http://{srv.addr}/console/customers/bg-console", headers={"cookie": cookie}, timeout=30)
    assert page.status_code == 200
    lines = [x for x in recs if x["batch_id"] == batch.id]
    assert console_row(page.text, batch.id)[2:6] == [
        "completed", "3 completed, 0 failed", "3", usd(lines)]
    (mine,) = [x for x in recs if x["id"] == record_id(r.id)]
    cells = console_row(page.text, r.id)
    assert [cells[2], cells[3], cells[4]] == [done.status, str(done.usage.output_tokens), usd([mine])]


def query(kind, database, sql):
    """One value of `sql` in the ledger (`database`: the SQLite path or the PostgreSQL URL)."""
    if kind == "sqlite":
        with sqlite3.connect(database) as conn:
            return conn.execute(sql).fetchone()[0]
    out = subprocess.run(["psql", database, "-tAc", sql], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_gateway_killed_mid_response_is_completed_by_the_next_and_billed_once(kind):
    args = ["--config", config(lease_secs=3)] + ledger_args(kind, "tollgate-background-kill-")
    if kind == "sqlite":
        args += ["--database", os.path.join(tempfile.mkdtemp(prefix="tollgate-background-kill-"), "ledger.db")]
    else:
        # A database of its own: no other test's server (the module's) may run its response.
        at = args.index("--database") + 1
        query(kind, args[at], "DROP DATABASE IF EXISTS tollgate_bg_kill")
        query(kind, args[at], "CREATE DATABASE tollgate_bg_kill")
        args[at] = args[at].rsplit("/", 1)[0] + "/tollgate_bg_kill"
    database = args[args.index("--database") + 1]
    first = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        client = client_of(first, "bg-kill")
        r = long_response(client)
        first_output(client, r.id)
    finally:
        first.proc.kill()
        first.proc.wait(timeout=60)
    state = f"SELECT status FROM background_responses WHERE id = '{r.id}'"
    assert query(kind, database, state) == "in_progress", "the response was not running when its gateway died"
    second = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        client = OpenAI(base_url=second.base_url, api_key=client.api_key, max_retries=0, timeout=120)
        done = ended(client, r.id)
        # The end tokens are banned: it runs to max_output_tokens.
        assert done.status == "incomplete" and done.usage.output_tokens == 400, done
        (rec,) = records(second, "bg-kill", 1)
        assert rec["id"] == record_id(r.id) and rec["output_tokens"] == 400, rec
        attempts = f"SELECT attempts FROM background_responses WHERE id = '{r.id}'"
        assert int(query(kind, database, attempts)) == 2
        events = list(client.responses.retrieve(r.id, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].type == "response.incomplete"
    finally:
        assert stop_server(second) == 0, "".join(second.log[-40:])
