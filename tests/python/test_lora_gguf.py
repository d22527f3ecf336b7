"""GGUF LoRA adapters (llama.cpp's layout) on `tollgate serve` with the dev model: one random
adapter written twice here, as a PEFT directory and as the GGUF file llama.cpp's
convert_lora_to_gguf.py writes from it (the `gguf` package's writer; B's Q/K rows permuted as
the converter permutes them). An operator's models.toml names the PEFT directory and the
`.gguf` file as two adapters: both answer the same, not the base model's answer. A customer's
adapter registered through the admin API with the `.gguf` path answers the same too; the base
model's own GGUF file given as an adapter is a 400 saying it is not a LoRA adapter. The same
file replaced in place by another adapter is read anew, never served from the copy held."""

import numpy as np
import gguf
import httpx
from openai import OpenAI
from safetensors.numpy import load_file

from conftest import API_KEY, customer_keys, start_server, stop_server, write_config
from lora_common import GGUF, ask, shape, write_adapter

ADMIN = "adm-lora-gguf"
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def interleave(b: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's Q/K rows in GGUF `llama`'s order (llama.cpp's converter's permutation)."""
    rows = b.shape[0]
    return b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_gguf(peft_dir, path, s: dict, alpha: float):
    """The PEFT adapter in `peft_dir` as a GGUF LoRA file at `path`."""
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    heads = {"q_proj": s["q"] // s["head_dim"], "k_proj": s["kv"] // s["head_dim"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name in sorted(tensors):
        if not name.endswith(".lora_A.weight"):
            continue
        stem = name[: -len(".lora_A.weight")]
        layer, module = int(stem.split(".")[4]), stem.split(".")[-1]
        a, b = tensors[name], tensors[stem + ".lora_B.weight"]
        if module in heads:
            b = interleave(b, heads[module])
        base = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        w.add_tensor(base + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(base + ".lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_lora_answers_as_its_peft_twin(tmp_path):
    s = shape()
    s["head_dim"] = 64
    assert s["q"] // s["head_dim"] == 9 and s["kv"] // s["head_dim"] == 3, s
    # write_adapter's alpha is 2r.
    write_adapter(tmp_path / "peft", s, 8, zero_b=False, seed=11)
    write_gguf(tmp_path / "peft", tmp_path / "noisy.gguf", s, 16.0)
    write_adapter(tmp_path / "other", s, 4, zero_b=False, seed=12)
    write_gguf(tmp_path / "other", tmp_path / "other.gguf", s, 8.0)
    catalogue = (
        '[models."smollm2"]\n'
        f'source = {{ path = "{GGUF}" }}\n'
        f'backend = {{ type = "local", kv_cache_bytes = {64 << 20} }}\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
        '[[models."smollm2".adapters]]\n'
        'name = "peft"\n'
        f'source = {{ path = "{tmp_path / "peft"}" }}\n'
        '[[models."smollm2".adapters]]\n'
        'name = "gguf"\n'
        f'source = {{ path = "{tmp_path / "noisy.gguf"}" }}\n')
    config = write_config("tollgate-lora-gguf-", catalogue)
    srv = start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN}, extra_args=["--config", config])
    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        base = ask(client, "smollm2")[0]
        peft = ask(client, "smollm2:peft")[0]
        assert peft != base, "the adapter changed nothing"
        assert ask(client, "smollm2:gguf")[0] == peft

        # A customer's adapter given as a `.gguf` path.
        keys = customer_keys(srv, ADMIN, ["acme"])
        acme = OpenAI(base_url=srv.base_url, api_key=keys["acme"], max_retries=0, timeout=300)

        def register(name, path):
            r = httpx.post(f"http://{srv.addr}/admin/v1/customers/acme/adapters",
                           json={"base_model": "smollm2", "name": name, "path": str(path)},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
            return r.status_code, r.json()

        status, error = register("model", GGUF)
        assert status == 400, error
        assert error["error"]["param"] == "path", error
        assert "not a LoRA adapter" in error["error"]["message"], error
        mine = tmp_path / "mine.gguf"
        mine.write_bytes((tmp_path / "noisy.gguf").read_bytes())
        status, added = register("mine", mine)
        assert status == 201, added
        assert ask(acme, "smollm2:mine")[0] == peft
        assert ask(acme, "smollm2:mine")[0] == peft

        # Another adapter written over the same file: read anew by the next request.
        mine.write_bytes((tmp_path / "other.gguf").read_bytes())
        other = ask(acme, "smollm2:mine")[0]
        assert other not in (peft, base), "the changed file was not read again"
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])
