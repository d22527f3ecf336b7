"""A model that must make room while a request uses it drains first, and requests waiting for
a load are bounded: two model ids on the dev model's file share a `model_memory_bytes` with
room for one; a stream on `alpha` is in flight when requests for `beta` arrive, so `alpha`
takes no new request, finishes its stream and only then unloads for `beta`. `beta` lets 2
requests wait for it (`max_queue = 2`); the ones beyond get 503 `model_loading` with
`Retry-After` at once, and the ones that waited are answered once it has loaded.

The stream is long by construction (end tokens banned with `NO_END`, 1000 tokens), so it is
still in flight while the requests for `beta` arrive and are counted.

And an unloaded model's memory leaves the process: after loads and unloads, the RSS with
nothing loaded comes back near what it was before any load (polled, with a deadline)."""

import threading
import time

import httpx
from openai import OpenAI

from conftest import API_KEY, NO_END, ROOT, start_server, stop_server, write_config

ADMIN = "adm-catalogue-drain"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KV = 64 << 20


def entry(model: str, max_queue: int) -> str:
    return (
        f'[models."{model}"]\n'
        f'source = {{ path = "{GGUF}" }}\n'
        f'backend = {{ type = "local", kv_cache_bytes = {KV}, max_queue = {max_queue} }}\n'
    )


def residency(srv) -> dict:
    r = httpx.get(f"http://{srv.addr}/admin/v1/models",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def beta_request(srv, out: list) -> None:
    r = httpx.post(f"{srv.base_url}/chat/completions", timeout=300,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "beta", "messages": [{"role": "user", "content": "Say hi"}],
                         "max_tokens": 4, "logit_bias": NO_END})
    out.append(r)


def test_a_busy_model_drains_before_it_makes_room_and_loads_wait_within_max_queue():
    budget = GGUF.stat().st_size + KV + (1 << 20)
    path = write_config("tollgate-drain-", f"[server]\nmodel_memory_bytes = {budget}\n\n"
                        + entry("alpha", 64) + "\n" + entry("beta", 2))
    srv = start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN},
                       extra_args=["--config", path, "--no-database"])
    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        assert residency(srv)["alpha"]["state"] == "loaded"
        stream = client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "Count"}],
            max_tokens=1000, logit_bias=NO_END, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        next(chunks)

        answers: list = []
        threads = [threading.Thread(target=beta_request, args=(srv, answers)) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        # Two wait for beta; the two beyond its max_queue are refused at once.
        while len(answers) < 2:
            assert time.time() < deadline, (answers, residency(srv))
            time.sleep(0.02)
        during = residency(srv)
        assert during["alpha"]["state"] == "draining" and during["alpha"]["in_use"] == 1, during
        assert during["beta"]["state"] == "unloaded", during
        for r in answers[:2]:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_loading", r.text
            assert int(r.headers["retry-after"]) > 0

        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[0].completion_tokens == 1000, "the draining model's stream ran to its end"
        for t in threads:
            t.join(timeout=120)
        assert [r.status_code for r in answers[2:]] == [200, 200], [r.text for r in answers[2:]]
        after = residency(srv)
        assert after["alpha"]["state"] == "unloaded" and after["beta"]["state"] == "loaded", after
        assert after["alpha"]["unloads_total"] == 1 and after["beta"]["loads_total"] == 1, after
    finally:
        code = stop_server(srv)
    assert code == 0, "".join(srv.log[-40:])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_an_unloaded_model_gives_its_memory_back():
    size = GGUF.stat().st_size
    # A budget smaller than the model: nothing loads at start, so the process's RSS before
    # any load is the baseline; a request loads it alone, and it unloads 1 s after.
    path = write_config("tollgate-reclaim-", "[server]\nmodel_memory_bytes = 1\n\n" + entry("alpha", 64).replace(
        "max_queue = 64 }\n", "max_queue = 64 }\nkeep_alive_secs = 1\n"))
    srv = start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN},
                       extra_args=["--config", path, "--no-database"])

    def unloaded(loads: int) -> None:
        deadline = time.time() + 60
        while (m := residency(srv)["alpha"])["state"] != "unloaded" or m["loads_total"] != loads:
            assert time.time() < deadline, m
            time.sleep(0.05)

    def settled_rss(limit: int) -> int:
        """The RSS once it is below `limit` (the engine's thread ends, then the memory is
        returned: polled, never assumed), or the last one read after 30 s."""
        deadline = time.time() + 30
        while (rss := rss_bytes(srv.proc.pid)) >= limit and time.time() < deadline:
            time.sleep(0.1)
        return rss

    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        unloaded(0)
        before = rss_bytes(srv.proc.pid)
        limit = before + size // 2
        # Loaded and unloaded again and again: after the first, the allocator serves loads
        # from memory it kept, unless what an unload frees is handed back.
        after = []
        for loads in range(1, 4):
            r = client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
            assert r.usage.completion_tokens > 0
            unloaded(loads)
            after.append(settled_rss(limit))
        assert max(after) < limit, f"RSS {after} with nothing loaded, {before} before any load"
    finally:
        code = stop_server(srv)
    assert code == 0, "".join(srv.log[-40:])
