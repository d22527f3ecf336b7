"""The catalogue within a memory budget, and reloaded while the server runs: two model ids on
the dev model's file with `model_memory_bytes` room for one of them, so requests that alternate
between them swap the models in and out; concurrent clients through the swaps all get 200.
Then models.toml is changed and reloaded (`POST /admin/v1/models/reload`, `SIGHUP`): a model
appears, one leaves while its stream is in flight (the stream still finishes), a price change
applies to the next request's record, an invalid file is refused and the catalogue stays.

Nothing here depends on the machine's speed: streams kept in flight are made long by banning
the end tokens (`NO_END`), and waits for the ledger and for a SIGHUP poll for their outcome."""

import os
import signal
import time
from decimal import Decimal

import httpx
import pytest
from openai import OpenAI

from conftest import API_KEY, NO_END, ROOT, run_concurrently, start_server, stop_server, write_config

ADMIN = "adm-catalogue-test"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KV = 64 << 20
# Room for one model (its file plus its KV reservation) and not two.
BUDGET = GGUF.stat().st_size + KV + (1 << 20)


def entry(model: str, input_price: str = "0.05") -> str:
    return (
        f'[models."{model}"]\n'
        f'source = {{ path = "{GGUF}" }}\n'
        f'backend = {{ type = "local", kv_cache_bytes = {KV}, max_queue = 64 }}\n'
        f'price = {{ input_per_mtok = "{input_price}", output_per_mtok = "0.10" }}\n'
    )


def upstream(model: str, extra: str = "") -> str:
    """An http model routed to a port nobody listens on (routes are not called here)."""
    return (
        f'[models."{model}"]\n'
        f'backend = {{ type = "http", urls = ["http://127.0.0.1:9"]{", " + extra if extra else ""} }}\n'
    )


def catalogue(*entries: str) -> str:
    return f"[server]\nmodel_memory_bytes = {BUDGET}\n\n" + "\n".join(entries)


@pytest.fixture(scope="module")
def srv():
    path = write_config("tollgate-catalogue-", catalogue(entry("alpha"), entry("beta")))
    server = start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN}, extra_args=["--config", path])
    server.config_path = path
    yield server
    code = stop_server(server)
    assert code == 0, "".join(server.log[-40:])


@pytest.fixture(scope="module")
def client(srv) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)


def admin(srv, method, path, expect=200, **kw):
    r = httpx.request(method, f"http://{srv.addr}/admin/v1{path}",
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300, **kw)
    assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def residency(srv) -> dict:
    return {m["id"]: m for m in admin(srv, "GET", "/models")["data"]}


def ask(client, model, max_tokens=4):
    """One short chat request; returns its request id (its record's id)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=max_tokens, logit_bias=NO_END,
    )
    assert raw.http_response.status_code == 200
    assert raw.parse().usage.completion_tokens == max_tokens
    return raw.headers["x-request-id"]


def record(srv, request_id, timeout=60):
    """The usage record of `request_id`, once the ledger has written it."""
    deadline = time.time() + timeout
    while True:
        cursor, found = None, None
        while found is None:
            params = {"limit": 500, **({"after": cursor} if cursor else {})}
            page = admin(srv, "GET", "/usage/records", params=params)
            found = next((r for r in page["data"] if r["id"] == request_id), None)
            if not page["data"]:
                break
            cursor = page["next_cursor"]
        if found is not None:
            return found
        assert time.time() < deadline, f"the record of {request_id} never arrived"
        time.sleep(0.2)


def test_one_model_fits_so_alternating_requests_swap_and_all_succeed(srv, client):
    start = residency(srv)
    # Catalogue order: alpha loaded at start, beta did not fit beside it.
    assert start["alpha"]["state"] == "loaded" and start["beta"]["state"] == "unloaded", start
    assert start["alpha"]["memory_bytes"] == GGUF.stat().st_size + KV
    listed = sorted(m.id for m in client.models.list().data)
    assert listed == ["alpha", "beta"], "the whole catalogue is listed, loaded or not"

    # Sequentially: every switch of model is a swap.
    for model in ["beta", "alpha", "beta"]:
        ask(client, model)
    after = residency(srv)
    assert after["beta"]["loads_total"] == 2 and after["alpha"]["unloads_total"] == 2, after
    assert after["beta"]["state"] == "loaded" and after["alpha"]["state"] == "unloaded", after

    # Concurrent clients on both models while they swap: every request answers 200.
    failures = []

    def client_loop(i):
        try:
            for j in range(3):
                ask(client, ["alpha", "beta"][(i + j) % 2])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            failures.append(repr(e))

    run_concurrently(client_loop, 8)
    assert failures == []
    now = residency(srv)
    # Never both at once: the budget holds one.
    assert [now[m]["state"] for m in ("alpha", "beta")].count("loaded") <= 1, now
    assert now["alpha"]["loads_total"] + now["beta"]["loads_total"] >= 4, now
    metrics = httpx.get(f"http://{srv.addr}/metrics", timeout=30).text
    for line in ('tollgate_model_loads_total{model="beta"}', 'tollgate_model_loaded{model="alpha"}',
                 'tollgate_model_memory_bytes{model="beta"}',
                 'tollgate_model_load_seconds_count{model="alpha"}'):
        assert line in metrics, line


def test_reload_adds_removes_reprices_and_refuses_an_invalid_file(srv, client):
    # A long stream on beta, in flight while beta leaves the catalogue.
    stream = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Count"}],
        max_tokens=200, logit_bias=NO_END, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    next(chunks)
    with open(srv.config_path, "w") as f:
        f.write(catalogue(entry("alpha", input_price="0.25"), entry("gamma")))
    outcome = admin(srv, "POST", "/models/reload")
    assert (outcome["added"], outcome["removed"], outcome["updated"]) == (["gamma"], ["beta"], ["alpha"])
    # The stream admitted before the reload runs to its end.
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[0].completion_tokens == 200
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "gamma"]
    with pytest.raises(Exception) as gone:
        ask(client, "beta")
    assert getattr(gone.value, "status_code", None) == 404
    assert Decimal(record(srv, ask(client, "alpha"))["input_price_per_mtok"]) == Decimal("0.25")
    ask(client, "gamma")

    # An invalid file: 400 with the parse error, and the catalogue in force stays.
    with open(srv.config_path, "w") as f:
        f.write(catalogue(entry("alpha")) + "\nunknown_key = 1\n")
    r = httpx.post(f"http://{srv.addr}/admin/v1/models/reload",
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert "unknown_key" in r.json()["error"]["message"]
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "gamma"]
    assert Decimal(record(srv, ask(client, "alpha"))["input_price_per_mtok"]) == Decimal("0.25")

    # A valid file whose new backend cannot be built (its key's variable is unset): refused too.
    with open(srv.config_path, "w") as f:
        f.write(catalogue(entry("alpha"), upstream("routed", 'api_key_env = "TOLLGATE_NO_SUCH_VAR"')))
    r = httpx.post(f"http://{srv.addr}/admin/v1/models/reload",
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 400 and "TOLLGATE_NO_SUCH_VAR" in r.json()["error"]["message"], r.text
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "gamma"]

    entries = admin(srv, "GET", "/audit", params={"limit": 1000})["data"]
    reloads = [e for e in entries if e["action"] == "catalogue.reloaded"]
    assert len(reloads) == 1 and reloads[0]["changes"]["added"] == ["gamma"], reloads


def test_sighup_reloads_and_an_invalid_file_is_logged(srv, client):
    # delta is new; routed is an http model, as gateways routing to workers have.
    with open(srv.config_path, "w") as f:
        f.write(catalogue(entry("alpha", input_price="0.25"), entry("gamma"), entry("delta"),
                          upstream("routed")))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 120
    while "delta" not in [m.id for m in client.models.list().data]:
        assert time.time() < deadline, "SIGHUP never reloaded the catalogue"
        time.sleep(0.1)
    ask(client, "delta")
    models = residency(srv)
    assert models["routed"]["backend"] == "http" and models["delta"]["backend"] == "local", models

    with open(srv.config_path, "w") as f:
        f.write("this is not toml")
    srv.proc.send_signal(signal.SIGHUP)
    while not any("SIGHUP: the catalogue is not reloaded" in line for line in srv.log):
        assert time.time() < deadline, "the refused reload was never logged"
        time.sleep(0.1)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "delta", "gamma", "routed"]
    ask(client, "alpha")
