"""LoRA adapters registered by the operator in models.toml, served by `tollgate serve` on the dev
model: two PEFT adapters written here with numpy and safetensors, sized from the GGUF's own
metadata: `noisy` (random A and B on every projection, its own price) and `zero` (B = 0, no
price: the base model's). Each is a model id `smollm2:<name>` listed in /v1/models; `zero`
answers exactly what the base model answers, `noisy` something else; the three run together
(one engine, the same batches) and each answers as alone; each usage record names the model
id it was billed as, at that id's prices. A reload that adds an adapter adds its model id and
keeps the base model's engine."""

from decimal import Decimal

import httpx
import pytest
from openai import OpenAI

from conftest import API_KEY, run_concurrently, start_server, stop_server, write_config
from lora_common import GGUF, ask, record, shape, write_adapter

ADMIN = "adm-lora-test"


def catalogue(tmp, extra: str = "") -> str:
    return (
        '[models."smollm2"]\n'
        f'source = {{ path = "{GGUF}" }}\n'
        f'backend = {{ type = "local", kv_cache_bytes = {64 << 20} }}\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
        '[[models."smollm2".adapters]]\n'
        'name = "noisy"\n'
        f'source = {{ path = "{tmp / "noisy"}" }}\n'
        'price = { input_per_mtok = "0.50", output_per_mtok = "1.00" }\n'
        '[[models."smollm2".adapters]]\n'
        'name = "zero"\n'
        f'source = {{ path = "{tmp / "zero"}" }}\n' + extra)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    s = shape()
    assert (s["layers"], s["hidden"], s["q"], s["kv"], s["ffn"]) == (30, 576, 576, 192, 1536), s
    write_adapter(tmp / "noisy", s, 8, zero_b=False, seed=1)
    write_adapter(tmp / "zero", s, 4, zero_b=True, seed=2)
    config = write_config("tollgate-lora-", catalogue(tmp))
    server = start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN}, extra_args=["--config", config])
    server.tmp, server.config = tmp, config
    yield server
    code = stop_server(server)
    assert code == 0, "".join(server.log[-40:])


@pytest.fixture(scope="module")
def client(srv) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)


def test_adapters_are_model_ids_and_answer_as_their_weights_say(srv, client):
    listed = sorted(m.id for m in client.models.list().data)
    assert listed == ["smollm2", "smollm2:noisy", "smollm2:zero"]
    assert client.models.retrieve("smollm2:zero").id == "smollm2:zero"

    base, base_id = ask(client, "smollm2")
    zero, zero_id = ask(client, "smollm2:zero")
    noisy, noisy_id = ask(client, "smollm2:noisy")
    assert zero == base, "a zero adapter (B = 0) must leave the base model's output unchanged"
    assert noisy != base, "a nonzero adapter changed nothing"
    # Again: now each prompt's KV is in the prefix cache, under its own adapter.
    assert ask(client, "smollm2:noisy")[0] == noisy
    assert ask(client, "smollm2")[0] == base

    # All three at once, batched together in one engine: each answers as alone.
    answers = {}

    def one(i):
        model = ["smollm2", "smollm2:zero", "smollm2:noisy"][i % 3]
        answers.setdefault(model, set()).add(ask(client, model)[0])

    run_concurrently(one, 6)
    assert answers == {"smollm2": {base}, "smollm2:zero": {base}, "smollm2:noisy": {noisy}}

    # The records name the model id billed, at its prices (the zero adapter: the base's).
    prices = {base_id: ("0.05", "0.10"), zero_id: ("0.05", "0.10"), noisy_id: ("0.50", "1.00")}
    models = {base_id: "smollm2", zero_id: "smollm2:zero", noisy_id: "smollm2:noisy"}
    for request_id, (input_price, output_price) in prices.items():
        rec = record(srv, request_id, ADMIN)
        assert rec["model"] == models[request_id], rec
        assert Decimal(str(rec["input_price_per_mtok"])) == Decimal(input_price), rec
        assert Decimal(str(rec["output_price_per_mtok"])) == Decimal(output_price), rec


def test_a_reload_adds_an_adapter_and_keeps_the_base_models_engine(srv, client):
    base = ask(client, "smollm2")[0]
    with open(srv.config, "w") as f:
        f.write(catalogue(srv.tmp, '[[models."smollm2".adapters]]\nname = "zero2"\n'
                                   f'source = {{ path = "{srv.tmp / "zero"}" }}\n'))
    r = httpx.post(f"http://{srv.addr}/admin/v1/models/reload",
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert r.status_code == 200, r.text
    outcome = r.json()
    assert outcome["added"] == ["smollm2:zero2"] and outcome["replaced"] == [], outcome
    assert ask(client, "smollm2:zero2")[0] == base
    assert ask(client, "smollm2:noisy")[0] != base
