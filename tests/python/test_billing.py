"""Customers, keys, metering and billing against the real server and model, with the official
OpenAI SDK as the client: what clients see in `usage` is exactly what the ledger holds."""

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import run_concurrently
from billing_common import (IN_NANO, MODEL, OUT_NANO, Admin, ask, billing, cancelled_stream, chat, nano, sdk,
                            tollgate)

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
