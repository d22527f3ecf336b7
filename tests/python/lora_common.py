"""What the LoRA tests share: the dev model's sizes from its GGUF metadata, and PEFT adapters
written with numpy and safetensors to fit them (or, given other sizes, not to)."""

import json
import time

import httpx
import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file

from conftest import NO_END, ROOT

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the capital of France?"}]


def shape() -> dict:
    """The dev model's sizes, from its GGUF metadata."""
    fields = GGUFReader(str(GGUF)).fields

    def num(key):
        f = fields[key]
        return int(f.parts[f.data[0]][0])

    hidden = num("llama.embedding_length")
    heads, kv_heads = num("llama.attention.head_count"), num("llama.attention.head_count_kv")
    head_dim = hidden // heads
    return {"layers": num("llama.block_count"), "hidden": hidden, "q": heads * head_dim,
            "kv": kv_heads * head_dim, "ffn": num("llama.feed_forward_length")}


def dims(s: dict, module: str) -> tuple:
    """(inputs, outputs) of a projection."""
    h, q, kv, f = s["hidden"], s["q"], s["kv"], s["ffn"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}[module]


def write_adapter(directory, s: dict, r: int, zero_b: bool, seed: int):
    """A PEFT adapter of rank `r` on every projection of every layer (B = 0 with `zero_b`)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(s["layers"]):
        for m in MODULES:
            parent = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"base_model.model.model.layers.{layer}.{parent}.{m}.lora_"
            inputs, outputs = dims(s, m)
            tensors[name + "A.weight"] = (rng.standard_normal((r, inputs)) * 0.05).astype(np.float32)
            b = np.zeros((outputs, r)) if zero_b else rng.standard_normal((outputs, r)) * 0.05
            tensors[name + "B.weight"] = b.astype(np.float32)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "target_modules": MODULES, "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))


def ask(client, model: str) -> tuple:
    """A greedy answer of 24 tokens (end tokens banned) and its request id."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=24, temperature=0, logit_bias=NO_END)
    assert raw.http_response.status_code == 200
    answer = raw.parse()
    assert answer.model == model
    assert answer.usage.completion_tokens == 24
    return answer.choices[0].message.content, raw.headers["x-request-id"]


def record(srv, request_id, admin, timeout=60) -> dict:
    """The usage record of `request_id` (read with the admin token `admin`), once the ledger
    has written it."""
    deadline = time.time() + timeout
    while True:
        r = httpx.get(f"http://{srv.addr}/admin/v1/usage/records", params={"limit": 500},
                      headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 200, r.text
        found = next((x for x in r.json()["data"] if x["id"] == request_id), None)
        if found is not None:
            return found
        assert time.time() < deadline, f"the record of {request_id} never arrived"
        time.sleep(0.2)
