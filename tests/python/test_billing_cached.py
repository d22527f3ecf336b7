"""Cached prompt tokens: reported to the client, stored in the ledger and priced at the cached
price, by the engine itself and through an upstream worker."""

import os
import subprocess
import tempfile
import time

import httpx
import openai

from conftest import API_KEY, NO_END, ROOT, free_port, start_server, stop_server
from billing_common import ADMIN, IN_NANO, MODEL, OUT_NANO, Admin, ask, nano, sdk

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
