"""Customers, keys, metering and billing against the real server and model, with the official
OpenAI SDK as the client: what clients see in `usage` is exactly what the ledger holds."""

import json
import sqlite3
import os
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import (API_KEY, NO_END, ROOT, free_port, run_concurrently, start_server, stop_server,
                      uncached_keys_config)

ADMIN = "admin-test-token"
MODEL = "smollm2-135m"
# models.toml prices smollm2-135m at 0.05 / 0.10 USD per million tokens: 50 and 100 nano-USD.
IN_NANO, OUT_NANO = 50, 100
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def ask(text):
    return [SYSTEM, {"role": "user", "content": text}]


def nano(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])


class Admin:
    def __init__(self, server):
        self.http = httpx.Client(
            base_url=f"http://{server.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )

    def call(self, method, path, expect=200, **kw):
        r = self.http.request(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def customer(self, cid, **fields):
        return self.call("POST", "/admin/v1/customers", 201, json={"id": cid, "name": cid, **fields})

    def key(self, cid, **fields):
        return self.call("POST", f"/admin/v1/customers/{cid}/keys", 201, json={"name": "k", **fields})

    def records(self):
        out, cursor = [], None
        while True:
            params = {"limit": 500}
            if cursor:
                params["after"] = cursor
            page = self.call("GET", "/admin/v1/usage/records", params=params)
            out += page["data"]
            if not page["data"]:
                return out
            cursor = page["next_cursor"]

    def wait_for(self, ids, timeout=30):
        """The records of these request ids, once all are in the database."""
        deadline = time.time() + timeout
        while True:
            by_id = {r["id"]: r for r in self.records()}
            if all(i in by_id for i in ids):
                return by_id
            if time.time() > deadline:
                missing = [i for i in ids if i not in by_id]
                raise AssertionError(f"records never arrived: {missing}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def billing():
    tmp = tempfile.mkdtemp(prefix="tollgate-billing-")
    db = os.path.join(tmp, "ledger.db")
    # Keys changed through the CLI (another process) are seen by the next request.
    config = uncached_keys_config(tmp)
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--config", config, "--database", db])
    srv.db = db
    yield srv
    code = stop_server(srv)
    assert code == 0, "server exited with %s:\n%s" % (code, "".join(srv.log[-40:]))


def sdk(server, key):
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def chat(client, text, max_tokens=12, stream=False, **kw):
    """One chat request; returns (request id, usage seen by the client, content chunks)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(text), max_tokens=max_tokens, temperature=0, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}), **kw
    )
    rid = raw.headers["x-request-id"]
    if not stream:
        r = raw.parse()
        return rid, (r.usage.prompt_tokens, r.usage.completion_tokens), None
    usage, chunks = None, 0
    for chunk in raw.parse():
        if chunk.usage:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
    return rid, usage, chunks


def cancelled_stream(client, text, after=3):
    """Streams, reads `after` content chunks, then hangs up. Returns (request id, chunks)."""
    # 2,000 tokens with the end tokens banned: still generating when the client hangs up, on any
    # machine (the hang-up is noticed within a step; the rest would take seconds at any speed).
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(text), max_tokens=2000, temperature=0, stream=True,
        logit_bias=NO_END,
    )
    rid = raw.headers["x-request-id"]
    stream = raw.parse()
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == after:
                break
    stream.close()
    return rid, seen


def test_client_usage_equals_ledger_per_customer(billing):
    admin = Admin(billing)
    admin.customer("sum-a")
    admin.customer("sum-b")
    keys = {c: admin.key(c)["key"] for c in ("sum-a", "sum-b")}
    seen = {}  # request id -> (customer, prompt tokens, completion tokens)
    cancelled = {}  # request id -> (customer, content chunks received)
    lock = threading.Lock()

    def work(customer, i):
        client = sdk(billing, keys[customer])
        rid, usage, _ = chat(client, f"Name a colour. ({i})", stream=i % 2 == 0)
        with lock:
            seen[rid] = (customer, *usage)

    for customer in keys:
        client = sdk(billing, keys[customer])
        for i, stream in enumerate([False, True, False, True]):
            rid, usage, _ = chat(client, f"Say hello number {i}.", stream=stream)
            seen[rid] = (customer, *usage)
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
        )
        r = raw.parse()
        seen[raw.headers["x-request-id"]] = (customer, r.usage.prompt_tokens, r.usage.completion_tokens)
        rid, usage, _ = chat(client, "Pick a number.", max_tokens=6, n=2, stream=False)
        seen[rid] = (customer, *usage)
        rid, chunks = cancelled_stream(client, "Write a long story about a dragon.")
        cancelled[rid] = (customer, chunks)
    threads = [threading.Thread(target=work, args=(c, i)) for i in range(4) for c in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    records = admin.wait_for(list(seen) + list(cancelled))
    for rid, (customer, prompt, completion) in seen.items():
        r = records[rid]
        assert (r["customer_id"], r["input_tokens"], r["output_tokens"]) == (customer, prompt, completion)
        assert r["status"] == "completed"
        assert nano(r["cost_usd"]) == prompt * IN_NANO + completion * OUT_NANO
    for rid, (customer, chunks) in cancelled.items():
        r = records[rid]
        assert r["customer_id"] == customer and r["status"] == "cancelled"
        assert r["stream"] is True
        # Billed for what the engine generated before it stopped: at least what was received,
        # never the whole max_tokens.
        assert chunks <= r["output_tokens"] < 2000
        assert nano(r["cost_usd"]) == r["input_tokens"] * IN_NANO + r["output_tokens"] * OUT_NANO

    # Aggregates per customer equal the sum of what the clients saw (plus the cancelled tails).
    rows = admin.call("GET", "/admin/v1/usage", params={"group_by": "customer"})["data"]
    by_customer = {row["customer_id"]: row for row in rows}
    for customer in keys:
        mine = [v for v in seen.values() if v[0] == customer]
        tails = [records[rid] for rid, v in cancelled.items() if v[0] == customer]
        row = by_customer[customer]
        assert row["requests"] == len(mine) + len(tails)
        assert row["input_tokens"] == sum(v[1] for v in mine) + sum(t["input_tokens"] for t in tails)
        assert row["output_tokens"] == sum(v[2] for v in mine) + sum(t["output_tokens"] for t in tails)
        mine_records = [r for r in records.values() if r["customer_id"] == customer]
        assert nano(row["cost_usd"]) == sum(nano(r["cost_usd"]) for r in mine_records)
        invoice = admin.call("GET", f"/admin/v1/invoices/{customer}")
        assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"])
        assert nano(invoice["total_usd"]) == nano(row["cost_usd"])
    csv_text = admin.call("GET", "/admin/v1/usage", params={"group_by": "customer,model,day", "format": "csv"})
    assert csv_text.splitlines()[0] == "customer_id,model,day,requests,input_tokens,output_tokens,cost_usd,cached_input_tokens"


def test_admin_api_and_key_rules(billing):
    admin = Admin(billing)
    no_token = httpx.get(f"http://{billing.addr}/admin/v1/customers")
    assert no_token.status_code == 401
    wrong = httpx.get(f"http://{billing.addr}/admin/v1/customers", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    c = admin.customer("rules", budget_usd="12.5", rpm=1000)
    assert c["budget_usd"] == "12.500000000" and c["rpm"] == 1000
    dup = admin.http.post("/admin/v1/customers", json={"id": "rules", "name": "again"})
    assert dup.status_code == 409
    bad = admin.http.post("/admin/v1/customers", json={"id": "bad-budget", "budget_usd": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "budget_usd"
    patched = admin.call("PATCH", "/admin/v1/customers/rules", json={"budget_usd": None, "tpm": 50000})
    assert patched["budget_usd"] is None and patched["tpm"] == 50000 and patched["rpm"] == 1000

    created = admin.key("rules", models=[MODEL])
    assert created["key"].startswith("tg-") and len(created["key"]) >= 3 + 32
    listed = admin.call("GET", "/admin/v1/customers/rules/keys")["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and created["key"] not in json.dumps(listed)
    client = sdk(billing, created["key"])
    chat(client, "Hi", max_tokens=2)
    past = admin.http.post("/admin/v1/customers/rules/keys", json={"expires_at": "2001-01-01T00:00:00Z"})
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at"
    # Ten seconds of life: enough for the first request to be served on a slow machine; the sleep
    # below waits out whatever is left of it.
    soon = admin.key("rules", expires_at=int(time.time()) + 10)
    expiring = sdk(billing, soon["key"])
    chat(expiring, "Hi", max_tokens=2)
    time.sleep(max(0.0, soon_deadline(soon) - time.time()) + 0.2)
    with pytest.raises(openai.AuthenticationError) as e:
        expiring.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    assert "expired" in e.value.message

    admin.call("DELETE", f"/admin/v1/keys/{created['id']}")
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    assert "revoked" in e.value.message
    assert admin.http.delete("/admin/v1/keys/key_nope").status_code == 404


def soon_deadline(key):
    from datetime import datetime

    return datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00")).timestamp()


def test_model_allow_list_is_enforced(billing):
    admin = Admin(billing)
    admin.customer("allow")
    key = admin.key("allow", models=[MODEL])
    # models.toml serves one model, so the refusal is shown with a key allowed none.
    empty = admin.key("allow", models=[])
    ok = sdk(billing, key["key"]).chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    assert ok.usage.completion_tokens >= 1
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(billing, empty["key"]).chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    assert e.value.code == "model_not_allowed"


def test_rate_limits_answer_429_with_headers(billing):
    admin = Admin(billing)
    admin.customer("rl")
    key = admin.key("rl", rpm=2)["key"]
    http = httpx.Client(base_url=billing.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    body = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 2}
    statuses = []
    for _ in range(3):
        r = http.post("/chat/completions", json=body)
        statuses.append(r.status_code)
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert "x-ratelimit-remaining-requests" in r.headers
        assert "x-ratelimit-reset-requests" in r.headers
    assert statuses == [200, 200, 429]
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert int(r.headers["retry-after"]) >= 1


def test_budget_holds_under_concurrency(billing):
    admin = Admin(billing)
    # A prompt of ~27 tokens and max_tokens 32 reserve at most 27*50 + 32*100 ≈ 4,550 nano-USD:
    # a budget of 20,000 nano-USD admits about four at a time.
    budget = 20_000
    admin.customer("budget", budget_usd="0.000020000")
    key = admin.key("budget")["key"]
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(20)

    def one(i):
        http = httpx.Client(base_url=billing.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        barrier.wait()
        r = http.post(
            "/chat/completions",
            json={"model": MODEL, "messages": ask(f"Count to five ({i})."), "max_tokens": 32, "temperature": 0},
        )
        with lock:
            results.append(r)

    run_concurrently(one, 20)
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == 20, [r.status_code for r in results]
    assert ok and refused
    for r in refused:
        assert r.json()["error"]["code"] == "insufficient_quota"
        assert "retry-after" in r.headers
    records = admin.wait_for([r.headers["x-request-id"] for r in ok])
    spent = sum(nano(rec["cost_usd"]) for rec in records.values() if rec["customer_id"] == "budget")
    # Every admitted request reserved its maximum cost first, so the spend cannot pass the budget.
    assert spent <= budget, f"spent {spent} nano-USD of a {budget} budget"
    customer = admin.call("GET", "/admin/v1/customers/budget")
    assert nano(customer["spent_usd_this_period"]) == spent


def test_customers_only_see_their_own_usage(billing):
    admin = Admin(billing)
    keys = {}
    for c in ("iso-a", "iso-b"):
        admin.customer(c)
        keys[c] = admin.key(c)["key"]
    ids = []
    for c, n in (("iso-a", 2), ("iso-b", 3)):
        for i in range(n):
            ids.append(chat(sdk(billing, keys[c]), f"Hello {i}", max_tokens=4)[0])
    records = admin.wait_for(ids)
    day = int(time.time()) // 86400 * 86400
    for c in keys:
        http = httpx.Client(base_url=billing.base_url, headers={"Authorization": f"Bearer {keys[c]}"})
        page = http.get(
            "/organization/usage/completions",
            params={"start_time": day, "bucket_width": "1d", "group_by": "model,api_key_id"},
        ).json()
        results = [res for bucket in page["data"] for res in bucket["results"]]
        own_key_ids = {k["id"] for k in admin.call("GET", f"/admin/v1/customers/{c}/keys")["data"]}
        assert results and {res["api_key_id"] for res in results} <= own_key_ids
        mine = [r for r in records.values() if r["customer_id"] == c]
        assert sum(res["num_model_requests"] for res in results) == len(mine)
        assert sum(res["input_tokens"] for res in results) == sum(r["input_tokens"] for r in mine)
        assert sum(res["output_tokens"] for res in results) == sum(r["output_tokens"] for r in mine)
        costs = http.get("/organization/costs", params={"start_time": day}).json()
        total = sum(res["amount"]["value"] for b in costs["data"] for res in b["results"])
        assert total == pytest.approx(sum(nano(r["cost_usd"]) for r in mine) / 1e9, abs=1e-12)
        # The admin API is not reachable with a customer key.
        assert http.get(f"http://{billing.addr}/admin/v1/customers").status_code == 401


def tollgate(*args, **kw):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    return subprocess.run([binary, *args], capture_output=True, text=True, check=True, **kw)


def test_cli_keys_and_incremental_export(billing):
    db = ["--database", billing.db]
    made = json.loads(tollgate("customers", "create", "cli-co", "--budget-usd", "5", *db).stdout)
    assert made["budget_usd"] == "5.000000000"
    key = json.loads(tollgate("keys", "create", "cli-co", "--name", "cron", *db).stdout)["key"]
    client = sdk(billing, key)
    first = [chat(client, f"One {i}", max_tokens=3)[0] for i in range(2)]
    admin = Admin(billing)
    admin.wait_for(first)
    cursor = Path(tempfile.mkdtemp()) / "cursor"
    out1 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    second = [chat(client, f"Two {i}", max_tokens=3)[0] for i in range(3)]
    admin.wait_for(second)
    out2 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    out3 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    ids1 = [json.loads(line)["id"] for line in out1.splitlines()]
    ids2 = [json.loads(line)["id"] for line in out2.splitlines()]
    assert set(first) <= set(ids1) and set(second) == set(ids2), "second run has exactly the new records"
    assert out3 == ""
    everything = [r["id"] for r in admin.records()]
    assert ids1 + ids2 == everything, "no gaps, no duplicates, ledger order"
    csv_out = tollgate("usage", "export", "--format", "csv", *db).stdout.splitlines()
    assert csv_out[0].startswith("id,customer_id,key_id,model,endpoint,stream,status")
    assert len(csv_out) == 1 + len(everything)
    invoice = json.loads(tollgate("usage", "invoice", "cli-co", *db).stdout)
    assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"]) > 0
    tollgate("keys", "revoke", json.loads(tollgate("keys", "list", "cli-co", *db).stdout)["data"][0]["id"], *db)
    # The running gateway sees a revocation made elsewhere at its next lookup: every request's (the
    # key cache's lifetimes are 0 in this config).
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)


def test_kill9_after_responses_loses_no_record():
    tmp = tempfile.mkdtemp(prefix="tollgate-kill-")
    args = ["--database", os.path.join(tmp, "ledger.db")]
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    client = sdk(srv, API_KEY)
    ids = []
    for i in range(4):
        ids.append(chat(client, f"Quick {i}", max_tokens=4, stream=i % 2 == 1)[0])
    # The test holds the database's write lock for the last four, so their records cannot reach
    # it before the kill, however fast the machine: they exist only in the spool, and the
    # restart must replay them.
    lock = sqlite3.connect(os.path.join(tmp, "ledger.db"), timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(4, 8):
            ids.append(chat(client, f"Quick {i}", max_tokens=4, stream=i % 2 == 1)[0])
        srv.proc.kill()  # SIGKILL right after the last response completed
        srv.proc.wait()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        records = Admin(srv).wait_for(ids, timeout=30)
        assert any("replaying spooled usage records" in line for line in srv.log), "".join(srv.log[-40:])
        ledger_ids = [r["id"] for r in Admin(srv).records()]
        assert sorted(ledger_ids) == sorted(set(ledger_ids)), "no record twice"
        assert set(ids) <= set(records)
    finally:
        assert stop_server(srv) == 0


def pg(cmd):
    return subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), cmd], capture_output=True, text=True, check=True
    ).stdout.strip()


def metric(server, name):
    text = httpx.get(f"http://{server.addr}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.skipif(
    not os.environ.get("TOLLGATE_TEST_POSTGRES"),
    reason="needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)",
)
def test_postgres_outage_mid_load_loses_and_doubles_nothing():
    url = pg("reset")
    spool = os.path.join(tempfile.mkdtemp(prefix="tollgate-pg-"), "ledger.spool")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", url, "--spool", spool])
    try:
        admin = Admin(srv)
        admin.customer("pg-co")
        key = admin.key("pg-co")["key"]
        client = sdk(srv, key)
        ids, errors = [], []
        chat(client, "warm up", max_tokens=2)  # the key is looked up once while the database is up

        def load(n, tag):
            for i in range(n):
                try:
                    ids.append(chat(client, f"{tag} {i}", max_tokens=4, stream=i % 2 == 0)[0])
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(repr(e))

        load(5, "before")
        pg("stop")
        load(10, "during")
        assert metric(srv, "tollgate_ledger_spooled_records") > 0
        pg("start")
        load(5, "after")
        assert not errors, errors
        deadline = time.time() + 30
        while metric(srv, "tollgate_ledger_pending_records") > 0:
            assert time.time() < deadline, "spooled records never reached PostgreSQL"
            time.sleep(0.2)
        ledger_ids = [r["id"] for r in admin.records()]
        assert len(ledger_ids) == len(set(ledger_ids))
        assert set(ids) <= set(ledger_ids)
        assert len(ledger_ids) == len(ids) + 1  # plus the warm-up
    finally:
        pg("start")
        assert stop_server(srv) == 0


# ---- cached prompt tokens --------------------------------------------------------------------

# A catalogue pricing cached prompt tokens at 0.02 USD per million: 20 nano-USD each.
CACHED_NANO = 20
CACHED_PRICE = 'price = { input_per_mtok = "0.05", output_per_mtok = "0.10", cached_input_per_mtok = "0.02" }\n'
LONG_SYSTEM = {
    "role": "system",
    "content": "You are a careful assistant for a bakery. You answer questions about bread, "
    "flour, ovens and opening hours in one short sentence, politely and without lists.",
}


def cached_catalogue(tmp, backend):
    path = os.path.join(tmp, "models.toml")
    with open(path, "w") as f:
        f.write(
            f'[models."{MODEL}"]\n'
            f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
            f"backend = {backend}\n" + CACHED_PRICE
        )
    return path



def cached_traffic(client):
    """Requests that share LONG_SYSTEM: streamed, not streamed, n > 1, legacy completions and a
    cancelled stream. Returns {request id: usage seen by the client or None if cancelled}."""
    seen = {}

    def ask_bakery(q, **kw):
        return [LONG_SYSTEM, {"role": "user", "content": q}]

    # Warm the prefix cache with the shared system prompt.
    r = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask_bakery("When do you open?"), max_tokens=4, temperature=0
    )
    seen[r.headers["x-request-id"]] = r.parse().usage
    for i, q in enumerate(["Do you sell rye bread?", "Is the oven hot?", "Which flour is best?"]):
        stream = i % 2 == 1
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask_bakery(q), max_tokens=6, temperature=0, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        rid = raw.headers["x-request-id"]
        if stream:
            usage = None
            for chunk in raw.parse():
                if chunk.usage:
                    usage = chunk.usage
            seen[rid] = usage
        else:
            seen[rid] = raw.parse().usage
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask_bakery("Name two breads."), max_tokens=5, temperature=0.7, n=2
    )
    seen[raw.headers["x-request-id"]] = raw.parse().usage
    prompt = LONG_SYSTEM["content"] + " Question: what is sourdough?"
    for _ in range(2):  # the second one finds the first's prompt in the cache
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        seen[raw.headers["x-request-id"]] = raw.parse().usage
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask_bakery("Tell me a very long story about bread."), max_tokens=2000,
        temperature=0, stream=True, logit_bias=NO_END,
    )
    rid = raw.headers["x-request-id"]
    got = 0
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    stream.close()
    seen[rid] = None
    return seen


def check_cached_billing(admin, customer, key, server, seen, *, cancelled_cached, source, cancelled_source):
    """Every record of `seen` is the client's usage and costs fresh × input + cached × cached +
    output × output to the nano-dollar; reports, the Usage API and the invoice add up to them."""
    records = admin.wait_for(list(seen))
    cached_total = 0
    for rid, usage in seen.items():
        r = records[rid]
        cached = r["cached_input_tokens"]
        if usage is None:
            assert r["status"] == "cancelled"
            if cancelled_cached:
                assert cached > 0, r
        else:
            assert r["status"] == "completed"
            assert (r["input_tokens"], r["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
            assert cached == usage.prompt_tokens_details.cached_tokens, (r, usage)
        assert 0 <= cached <= r["input_tokens"]
        assert r["cached_input_price_per_mtok"] == "0.02"
        assert r["usage_source"] == (cancelled_source if usage is None else source), r
        fresh = r["input_tokens"] - cached
        assert nano(r["cost_usd"]) == fresh * IN_NANO + cached * CACHED_NANO + r["output_tokens"] * OUT_NANO, r
        assert nano(r["cached_input_cost_usd"]) == cached * CACHED_NANO
        cached_total += cached
    completed = [u for u in seen.values() if u is not None]
    # The shared system prompt came from the cache for most of them (the first only warmed it).
    assert sum(1 for u in completed if u.prompt_tokens_details.cached_tokens > 0) >= len(completed) - 2
    assert cached_total > 0
    mine = [r for r in records.values() if r["customer_id"] == customer]
    assert len(mine) == len(seen)

    row = admin.call("GET", "/admin/v1/usage", params={"customer_id": customer, "group_by": "customer"})["data"][0]
    assert row["input_cached_tokens"] == cached_total
    assert nano(row["cost_usd"]) == sum(nano(r["cost_usd"]) for r in mine)

    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    page = http.get(
        "/organization/usage/completions", params={"start_time": int(time.time()) - 3600, "bucket_width": "1d"}
    ).json()
    results = [res for b in page["data"] for res in b["results"]]
    assert sum(res["input_cached_tokens"] for res in results) == cached_total
    assert sum(res["input_tokens"] for res in results) == sum(r["input_tokens"] for r in mine)

    invoice = admin.call("GET", f"/admin/v1/invoices/{customer}")
    lines = {li["kind"]: li for li in invoice["line_items"]}
    assert lines["cached_input"]["cached_input_tokens"] == cached_total
    assert lines["cached_input"]["cached_input_price_per_mtok"] == "0.02"
    assert nano(lines["cached_input"]["amount_usd"]) == cached_total * CACHED_NANO
    assert lines["tokens"]["input_tokens"] == sum(r["input_tokens"] for r in mine) - cached_total
    assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"])
    assert nano(invoice["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine)
    print(
        f"\n{customer}: {len(mine)} records, {sum(r['input_tokens'] for r in mine)} prompt tokens of which "
        f"{cached_total} cached, total {invoice['total_usd']} USD "
        f"(cached line {lines['cached_input']['amount_usd']})"
    )


def test_cached_prompt_tokens_are_reported_stored_and_priced():
    tmp = tempfile.mkdtemp(prefix="tollgate-cached-")
    config = cached_catalogue(tmp, '{ type = "local", device = "cpu" }')
    srv = start_server(
        {"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--config", config, "--database", os.path.join(tmp, "ledger.db")]
    )
    try:
        admin = Admin(srv)
        admin.customer("cache-co")
        key = admin.key("cache-co")["key"]
        seen = cached_traffic(sdk(srv, key))
        check_cached_billing(
            admin, "cache-co", key, srv, seen, cancelled_cached=True, source="engine", cancelled_source="engine"
        )
    finally:
        assert stop_server(srv) == 0


def test_cached_prompt_tokens_of_an_upstream_are_priced_by_the_gateway():
    """Gateway -> `tollgate worker`: the worker reports `prompt_tokens_details.cached_tokens`,
    the gateway prices them at its own catalogue's cached price."""
    tmp = tempfile.mkdtemp(prefix="tollgate-cached-up-")
    port = free_port()
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    env = dict(os.environ, TOLLGATE_WORKER_TOKEN="worker-token", RUST_LOG="info")
    worker = subprocess.Popen(
        [binary, "worker", "--model", MODEL, "--config", str(ROOT / "models.toml"), "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    srv = None
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer worker-token"}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and worker.poll() is None, "worker did not start"
            time.sleep(0.2)
        config = cached_catalogue(
            tmp, f'{{ type = "http", urls = ["http://127.0.0.1:{port}"], api_key_env = "TOLLGATE_WORKER_TOKEN" }}'
        )
        srv = start_server(
            {"TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_WORKER_TOKEN": "worker-token"},
            ["--config", config, "--database", os.path.join(tmp, "ledger.db")],
        )
        admin = Admin(srv)
        admin.customer("cache-up")
        key = admin.key("cache-up")["key"]
        # The gateway routes once a probe found the worker healthy (probed with the static key
        # of the `default` customer, so cache-up's bill holds only the requests below).
        deadline = time.time() + 30
        while True:
            try:
                sdk(srv, API_KEY).chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=1)
                break
            except openai.APIStatusError:
                assert time.time() < deadline
                time.sleep(0.3)
        seen = cached_traffic(sdk(srv, key))
        # An upstream's cached count arrives with its usage at the end: a cancelled request's
        # prompt is billed at the input price, its output as the gateway counted it.
        check_cached_billing(
            admin, "cache-up", key, srv, seen, cancelled_cached=False, source="upstream",
            cancelled_source="observed",
        )
    finally:
        if srv is not None:
            assert stop_server(srv) == 0
        worker.terminate()
        worker.wait(timeout=60)


# ---- cost-allocation tags --------------------------------------------------------------------


def test_tags_from_metadata_user_and_key_defaults(billing):
    admin = Admin(billing)
    admin.customer("tag-co")
    key_a = admin.key("tag-co", tags={"team": "ml", "project": "ops"})
    key_b = admin.key("tag-co")
    a, b = sdk(billing, key_a["key"]), sdk(billing, key_b["key"])
    expected = {}  # request id -> tags the record must carry

    raw = a.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("Hi"), max_tokens=3, temperature=0,
        metadata={"project": "alpha", "env": "prod"}, user="u-1",
    )
    # The key's defaults win over the request's metadata (project), the rest is merged.
    expected[raw.headers["x-request-id"]] = {"team": "ml", "project": "ops", "env": "prod", "user": "u-1"}
    for i, stream in enumerate([False, True]):
        rid, _, _ = chat(b, f"Colour {i}", max_tokens=3, stream=stream, metadata={"project": "alpha"}, user="u-2")
        expected[rid] = {"project": "alpha", "user": "u-2"}
    raw = b.completions.with_raw_response.create(
        model=MODEL, prompt="Bread is", max_tokens=3, temperature=0, user="u-3",
        extra_body={"metadata": {"project": "beta"}},
    )
    expected[raw.headers["x-request-id"]] = {"project": "beta", "user": "u-3"}
    rid, _, _ = chat(b, "No tags", max_tokens=2)
    expected[rid] = {}

    # Limits: 16 pairs, keys up to 64 and values up to 512 characters; a 400 names the field.
    bad = [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"k": "v" * 513}, "metadata.k"),
    ]
    for metadata, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            b.chat.completions.create(model=MODEL, messages=ask("x"), max_tokens=2, metadata=metadata)
        assert e.value.param == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        b.chat.completions.create(model=MODEL, messages=ask("x"), max_tokens=2, metadata={"k": 5})
    assert e.value.param.startswith("metadata"), e.value.body
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    rid = b.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("x"), max_tokens=2, metadata=ok
    ).headers["x-request-id"]
    expected[rid] = ok

    records = admin.wait_for(list(expected))
    for rid, tags in expected.items():
        assert records[rid]["tags"] == tags, records[rid]
    mine = [r for r in admin.records() if r["customer_id"] == "tag-co"]
    assert len(mine) == len(expected), "refused requests leave no record"

    # Reports group and filter by a tag; every figure adds up to the records.
    rows = admin.call("GET", "/admin/v1/usage", params={"customer_id": "tag-co", "group_by": "tag:project"})["data"]
    by_project = {row["tag:project"]: row for row in rows}
    projects = {r["tags"].get("project") for r in mine}
    assert set(by_project) == projects
    for project, row in by_project.items():
        theirs = [r for r in mine if r["tags"].get("project") == project]
        assert row["requests"] == len(theirs)
        assert nano(row["cost_usd"]) == sum(nano(r["cost_usd"]) for r in theirs)
    alpha = admin.call("GET", "/admin/v1/usage", params={"customer_id": "tag-co", "tag": "project:alpha"})["data"][0]
    assert alpha["requests"] == 2
    csv_text = admin.call(
        "GET", "/admin/v1/usage", params={"customer_id": "tag-co", "group_by": "tag:user", "format": "csv"}
    )
    assert csv_text.splitlines()[0] == "tag:user,requests,input_tokens,output_tokens,cost_usd,cached_input_tokens"

    invoice = admin.call("GET", "/admin/v1/invoices/tag-co", params={"group_by": "tag:project"})
    assert nano(invoice["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine)
    assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"])
    assert {li["tag"]["value"] for li in invoice["line_items"]} == projects
    beta = admin.call("GET", "/admin/v1/invoices/tag-co", params={"tag": "project:beta"})
    assert nano(beta["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine if r["tags"].get("project") == "beta")
    admin.call("GET", "/admin/v1/invoices/tag-co", 400, params={"group_by": "model"})
    admin.call("GET", "/admin/v1/usage", 400, params={"tag": "nocolon"})

    # Key defaults change through the admin API (and the CLI), seen by the next request.
    patched = admin.call("PATCH", f"/admin/v1/keys/{key_b['id']}", json={"tags": {"team": "web"}})
    assert patched["tags"] == {"team": "web"}
    admin.call("PATCH", f"/admin/v1/keys/{key_b['id']}", 400, json={"tags": {"k": "v" * 513}})
    rid, _, _ = chat(b, "After patch", max_tokens=2, user="u-9")
    assert admin.wait_for([rid])[rid]["tags"] == {"team": "web", "user": "u-9"}
    db = ["--database", billing.db]
    tagged = json.loads(tollgate("keys", "tag", key_b["id"], "--tag", "team=data", "--tag", "cost=centre=7", *db).stdout)
    assert tagged["tags"] == {"team": "data", "cost": "centre=7"}
    made = json.loads(tollgate("keys", "create", "tag-co", "--name", "cli", "--tag", "project=gamma", *db).stdout)
    assert made["tags"] == {"project": "gamma"}

    # Exports carry the tags and filter on one.
    out = tollgate("usage", "export", "--format", "jsonl", "--tag", "project:alpha", *db).stdout
    exported = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in exported) == sorted(
        rid for rid, t in expected.items() if t.get("project") == "alpha"
    )
    report = json.loads(
        tollgate("usage", "report", "--customer-id", "tag-co", "--group-by", "tag:project", *db).stdout
    )
    assert {row["tag:project"] for row in report["data"]} == projects
    inv = json.loads(tollgate("usage", "invoice", "tag-co", "--tag", "project:beta", *db).stdout)
    assert inv["total_usd"] == beta["total_usd"]


# ---- exports billing systems ingest ----------------------------------------------------------

CLOUDEVENT_NAME = __import__("re").compile(r"^[a-z0-9]{1,20}$")


def check_cloudevent(e):
    """The CloudEvents 1.0 JSON format's rules (spec.md, json-format.md): required context
    attributes, their types, attribute names, and JSON data for application/json."""
    from datetime import datetime
    from urllib.parse import urlparse

    for attr in ("specversion", "id", "source", "type"):
        assert isinstance(e.get(attr), str) and e[attr], f"required attribute {attr}: {e}"
    assert e["specversion"] == "1.0"
    urlparse(e["source"])  # a URI-reference
    assert all(CLOUDEVENT_NAME.match(k) for k in e if k != "data"), sorted(e)
    assert isinstance(e["subject"], str) and e["subject"]
    datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
    assert e["datacontenttype"] == "application/json" and isinstance(e["data"], dict)


def check_stripe_event(e, customer_key="stripe_customer_id"):
    """Stripe's `POST /v1/billing/meter_events` body: event_name (<= 100), identifier
    (<= 5000, unique), timestamp (Unix seconds, within the past 35 days), payload of strings
    holding the customer mapping key."""
    assert set(e) == {"event_name", "identifier", "timestamp", "payload"}, e
    assert 0 < len(e["event_name"]) <= 100 and 0 < len(e["identifier"]) <= 5000
    assert isinstance(e["timestamp"], int) and time.time() - 35 * 86400 < e["timestamp"] <= time.time() + 300
    assert all(isinstance(v, str) for v in e["payload"].values()), e["payload"]
    assert e["payload"][customer_key]
    for kind in ("input_tokens", "cached_input_tokens", "output_tokens"):
        assert e["payload"][kind].isdigit()


def test_exports_as_cloudevents_and_stripe_meter_events(billing):
    admin = Admin(billing)
    admin.customer("exp-co")
    client = sdk(billing, admin.key("exp-co")["key"])
    db = ["--database", billing.db]
    cursor = Path(tempfile.mkdtemp()) / "cursor"
    first = [chat(client, f"Export {i}", max_tokens=3, metadata={"project": "x"})[0] for i in range(2)]
    admin.wait_for(first)
    out1 = tollgate("usage", "export", "--format", "cloudevents", "--cursor-file", str(cursor), *db).stdout
    second = [chat(client, f"Export again {i}", max_tokens=3)[0] for i in range(2)]
    records = admin.wait_for(second + first)
    out2 = tollgate("usage", "export", "--format", "cloudevents", "--cursor-file", str(cursor), *db).stdout
    events1 = [json.loads(line) for line in out1.splitlines()]
    events2 = [json.loads(line) for line in out2.splitlines()]
    assert set(first) <= {e["id"] for e in events1}
    assert {e["id"] for e in events2} == set(second), "incremental: only the new records"
    for e in events1 + events2:
        check_cloudevent(e)
    for rid in first + second:
        e = next(e for e in events1 + events2 if e["id"] == rid)
        r = records[rid]
        assert e["subject"] == "exp-co"
        assert (e["data"]["input_tokens"], e["data"]["output_tokens"]) == (r["input_tokens"], r["output_tokens"])
        assert e["data"]["cost_usd"] == r["cost_usd"] and e["data"]["tags"] == r["tags"]

    # Stripe: Tollgate customers mapped to Stripe's; an unmapped customer stops the export.
    mapping = Path(tempfile.mkdtemp()) / "customers.json"
    mapping.write_text(json.dumps({"exp-co": "cus_EXP"}))
    out = tollgate(
        "usage", "export", "--format", "stripe", "--tag", "project:x", "--stripe-customer-map", str(mapping), *db
    ).stdout
    stripe = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["identifier"] for e in stripe) == sorted(first)
    for e in stripe:
        check_stripe_event(e)
        r = records[e["identifier"]]
        assert e["event_name"] == "tollgate_usage" and e["payload"]["stripe_customer_id"] == "cus_EXP"
        assert int(e["payload"]["output_tokens"]) == r["output_tokens"]
        assert int(e["payload"]["input_tokens"]) + int(e["payload"]["cached_input_tokens"]) == r["input_tokens"]
    admin.customer("exp-unmapped")
    admin.wait_for([chat(sdk(billing, admin.key("exp-unmapped")["key"]), "Unmapped", max_tokens=2)[0]])
    stripe_cursor = Path(tempfile.mkdtemp()) / "cursor"
    failed = subprocess.run(
        [os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate")), "usage", "export",
         "--format", "stripe", "--stripe-customer-map", str(mapping), "--cursor-file", str(stripe_cursor), *db],
        capture_output=True, text=True,
    )
    assert failed.returncode != 0 and "has no Stripe customer" in failed.stderr
    assert not stripe_cursor.exists(), "a failed export does not advance its cursor"


# ---- per-key budgets -------------------------------------------------------------------------


def test_a_key_budget_caps_that_key_alone(billing):
    admin = Admin(billing)
    admin.customer("kb-co", budget_usd="1")
    capped = admin.key("kb-co", budget_usd="0.00001")  # 10,000 nano-USD
    assert capped["budget_usd"] == "0.000010000"
    free = admin.key("kb-co")
    client = sdk(billing, capped["key"])
    ids, refused = [], None
    for i in range(20):
        try:
            ids.append(chat(client, f"Budget {i}", max_tokens=20)[0])
        except openai.RateLimitError as e:
            refused = e
            break
    assert refused is not None, "the key's budget never refused"
    assert refused.code == "insufficient_quota" and f"budget of key {capped['id']}" in refused.message
    records = admin.wait_for(ids)
    spent = sum(nano(records[i]["cost_usd"]) for i in ids)
    assert 0 < spent <= 10_000 and len(ids) >= 1
    # The customer's other key is not capped by it.
    chat(sdk(billing, free["key"]), "Still fine", max_tokens=3)
    # Cleared through the admin API, set again by the CLI: each seen by the next request.
    cleared = admin.call("PATCH", f"/admin/v1/keys/{capped['id']}", json={"budget_usd": None})
    assert cleared["budget_usd"] is None
    admin.call("PATCH", f"/admin/v1/keys/{capped['id']}", 400, json={"budget_usd": "-1"})
    chat(client, "Uncapped now", max_tokens=20)
    out = json.loads(tollgate("keys", "budget", capped["id"], "--budget-usd", "0.000001", "--database", billing.db).stdout)
    assert out["budget_usd"] == "0.000001000"
    with pytest.raises(openai.RateLimitError):
        chat(client, "Capped again", max_tokens=20)
