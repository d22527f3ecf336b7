"""LoRA adapters through `tollgate worker`s (issue 34, item 6): a gateway (SQLite ledger) in
front of two workers running the dev model, its `smollm2` a pool of them
(`forward_customer = true`). Three adapters, written here with numpy and safetensors:

- `noisy`, the operator's, declared in the workers' models.toml and in the gateway's without
  `source`: the gateway names it and each worker uses its own;
- `zero` (B = 0), declared in the gateway's models.toml only, with `source`: the gateway sends
  its path and the workers read it;
- `pirate`, a customer's, registered through the admin API: its path goes with its requests;
- `wide`, shaped for another model: refused when a customer registers it (a worker checks it),
  and as the operator's (the gateway's models.toml) a clear error when requested.

Each answers greedily exactly what `tollgate serve` answers in one process with the same
adapters. The worker that ran an adapter reports it in `/health`, and the next requests for that
adapter go to it (the other worker never loads it), although with both idle the pool's usual
order alternates. A customer's adapter serves its owner only; its records name the base model
and the adapter. An adapter the worker cannot load is a 500 `adapter_unavailable` for the
client (no path in it), recorded failed and not charged, and no worker leaves the pool."""

import time
from decimal import Decimal

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import (API_KEY, NO_END, customer_keys, free_port, start_server, start_worker,
                      stop_server, write_config)
from lora_common import GGUF, PROMPT, ask, record, shape, write_adapter

ADMIN = "adm-lora-workers"
TOKEN = "wk-lora-token"
KV = 64 << 20


def local_model(extra_adapters: str = "") -> str:
    return (f'[models."smollm2"]\nsource = {{ path = "{GGUF}" }}\n'
            f'backend = {{ type = "local", kv_cache_bytes = {KV} }}\n'
            'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n' + extra_adapters)


def adapter(name: str, path=None, price: str = "") -> str:
    source = f'source = {{ path = "{path}" }}\n' if path else ""
    return f'[[models."smollm2".adapters]]\nname = "{name}"\n{source}{price}'


def gateway_model(ports) -> str:
    urls = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
    return (f'[models."smollm2"]\nsource = {{ path = "{GGUF}" }}\n'
            f'backend = {{ type = "http", urls = [{urls}], api_key_env = "TOLLGATE_WORKER_TOKEN", '
            'forward_customer = true }\n'
            'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n')


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-workers")
    s = shape()
    write_adapter(tmp / "noisy", s, 8, zero_b=False, seed=1)
    write_adapter(tmp / "zero", s, 4, zero_b=True, seed=2)
    write_adapter(tmp / "pirate", s, 8, zero_b=False, seed=7)
    write_adapter(tmp / "wide", dict(s, hidden=2 * s["hidden"]), 4, zero_b=False, seed=8)
    return tmp


@pytest.fixture(scope="module")
def reference(tmp) -> dict:
    """Each model id's greedy answer from `tollgate serve` alone (every adapter the operator's)."""
    config = write_config("tollgate-lora-workers-ref-", local_model(
        adapter("noisy", tmp / "noisy") + adapter("zero", tmp / "zero")
        + adapter("pirate", tmp / "pirate")))
    srv = start_server(extra_args=["--config", config, "--no-database"])
    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        return {m: ask(client, f"smollm2{m}")[0] for m in ["", ":noisy", ":zero", ":pirate"]}
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])


@pytest.fixture(scope="module")
def cluster(tmp, reference):
    ports = [free_port(), free_port()]
    worker_config = write_config("tollgate-lora-workers-w-",
                                 local_model(adapter("noisy", tmp / "noisy")))
    workers = [start_worker(p, TOKEN, model="smollm2", config=worker_config) for p in ports]
    config = write_config("tollgate-lora-workers-gw-", gateway_model(ports) + adapter(
        "noisy", price='price = { input_per_mtok = "0.50", output_per_mtok = "1.00" }\n')
        + adapter("zero", tmp / "zero") + adapter("wide", tmp / "wide"))
    try:
        gateway = start_server(extra_env={"TOLLGATE_WORKER_TOKEN": TOKEN,
                                          "TOLLGATE_ADMIN_TOKEN": ADMIN},
                               extra_args=["--config", config])
    except Exception:
        for w, _ in workers:
            w.kill()
        raise
    gateway.ports, gateway.workers = ports, workers
    yield gateway
    code = stop_server(gateway)
    for w, _ in workers:
        w.terminate()
        w.wait(timeout=60)
    assert code == 0, "".join(gateway.log[-40:])


def held(port) -> list:
    """The adapter keys a worker's `/health` lists for its model."""
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
    assert r.status_code == 200, r.text
    (model,) = [m for m in r.json()["models"] if m["id"] == "smollm2"]
    return model.get("adapters", [])


def chats(port) -> int:
    """Chat requests a worker has answered."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("tollgate_requests_total{")
                   and 'route="/v1/chat/completions"' in line))


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, what
        time.sleep(0.2)
    return value


def test_operator_adapters_answer_as_in_one_process_on_the_worker_that_holds_them(cluster, reference):
    client = OpenAI(base_url=cluster.base_url, api_key=API_KEY, max_retries=0, timeout=300)
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == ["smollm2", "smollm2:noisy", "smollm2:wide", "smollm2:zero"]
    assert ask(client, "smollm2")[0] == reference[""]
    assert reference[":noisy"] != reference[""], "the adapter changed nothing"
    assert all(not any(k.startswith("name:") for k in held(p)) for p in cluster.ports)

    before = [chats(p) for p in cluster.ports]
    noisy, noisy_id = ask(client, "smollm2:noisy")
    assert noisy == reference[":noisy"]
    ran = [chats(p) - b for p, b in zip(cluster.ports, before)]
    assert sorted(ran) == [0, 1], ran
    holder = cluster.ports[ran.index(1)]
    other = cluster.ports[ran.index(0)]
    # The worker's own `noisy`, named by the gateway: listed by name (and by its files' key).
    assert "name:noisy" in wait_for(lambda: held(holder), "the holder to list noisy")
    assert held(other) == []

    # The next requests for it go to the worker that holds it (the usual order would alternate
    # between two idle workers); the base model's meanwhile go to either.
    before = [chats(p) for p in cluster.ports]
    for _ in range(4):
        assert ask(client, "smollm2:noisy")[0] == noisy
    ran = [chats(p) - b for p, b in zip(cluster.ports, before)]
    assert ran[cluster.ports.index(holder)] == 4, ran
    assert held(other) == [], "the other worker loaded the adapter too"

    # `zero`: its path sent by the gateway, read by a worker; B = 0 leaves the base's answer.
    zero, zero_id = ask(client, "smollm2:zero")
    assert zero == reference[":zero"] == reference[""]

    # The records name the model id, its base model and the adapter, at the id's prices.
    rec = record(cluster, noisy_id, ADMIN)
    assert (rec["model"], rec["base_model"], rec["adapter"]) == ("smollm2:noisy", "smollm2", "noisy"), rec
    assert Decimal(str(rec["output_price_per_mtok"])) == Decimal("1.00"), rec
    rec = record(cluster, zero_id, ADMIN)
    assert (rec["model"], rec["base_model"], rec["adapter"]) == ("smollm2:zero", "smollm2", "zero"), rec


def admin(cluster, method, path, body=None):
    r = httpx.request(method, f"http://{cluster.addr}/admin/v1{path}", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    return r.status_code, r.json()


def test_a_customers_adapter_runs_on_the_workers_from_its_path(cluster, reference, tmp):
    keys = customer_keys(cluster, ADMIN, ["acme", "other"])
    acme = OpenAI(base_url=cluster.base_url, api_key=keys["acme"], max_retries=0, timeout=300)
    other = OpenAI(base_url=cluster.base_url, api_key=keys["other"], max_retries=0, timeout=300)
    status, added = admin(cluster, "POST", "/customers/acme/adapters",
                          {"base_model": "smollm2", "name": "pirate", "path": str(tmp / "pirate")})
    assert status == 201, added
    assert "smollm2:pirate" in [m.id for m in acme.models.list().data]
    pirate, pirate_id = ask(acme, "smollm2:pirate")
    assert pirate == reference[":pirate"]
    with pytest.raises(openai.NotFoundError):
        ask(other, "smollm2:pirate")
    rec = record(cluster, pirate_id, ADMIN)
    assert (rec["model"], rec["base_model"], rec["adapter"], rec["customer_id"]) == (
        "smollm2:pirate", "smollm2", "pirate", "acme"), rec
    # Its key on the worker that ran it is its path's digest, never the path.
    keys_held = [k for p in cluster.ports for k in held(p)]
    assert not any("pirate" in k for k in keys_held), keys_held
    assert ask(acme, "smollm2:pirate")[0] == pirate


def test_an_adapter_a_worker_cannot_load_is_refused_or_a_clear_uncharged_error(cluster, tmp):
    keys = customer_keys(cluster, ADMIN, ["wideco"])
    # A customer's: checked on a worker when registered, refused with the reason.
    status, error = admin(cluster, "POST", "/customers/wideco/adapters",
                          {"base_model": "smollm2", "name": "broad", "path": str(tmp / "wide")})
    assert status == 400, error
    assert error["error"]["param"] == "path" and "cannot be loaded" in error["error"]["message"], error
    # The operator's (`wide` in the gateway's models.toml): found out by the worker.
    raw = httpx.post(f"{cluster.base_url}/chat/completions",
                     headers={"Authorization": f"Bearer {keys['wideco']}"}, timeout=300,
                     json={"model": "smollm2:wide", "messages": PROMPT, "max_tokens": 4,
                           "logit_bias": NO_END})
    assert raw.status_code == 500, raw.text
    error = raw.json()["error"]
    assert error["code"] == "adapter_unavailable" and "cannot be loaded" in error["message"], error
    assert str(tmp) not in raw.text, "the adapter's path reached the client"
    rec = record(cluster, raw.headers["x-request-id"], ADMIN)
    assert rec["status"] == "failed" and Decimal(str(rec["cost_usd"])) == 0, rec
    assert rec["output_tokens"] == 0, rec
    # No worker was ejected for it (an ejected one is readmitted by the next probe, within a
    # second or two, and the gateway says so in its log).
    time.sleep(3)
    log = "".join(cluster.log)
    assert "readmitted" not in log, log[-3000:]
