"""A `tollgate worker` reloads its models.toml as a gateway does: on `SIGHUP` (and
`POST /admin/v1/models/reload` when it has an admin token), its model's new serving is put in
force while a stream on the old one, routed through a gateway, runs to its end; a file without
the worker's model, or an invalid one, is refused and the worker keeps serving. A `SIGHUP`
that arrives while a server is still starting does not end it.

Streams kept in flight are long by construction (end tokens banned with `NO_END`); waits poll
for their outcome."""

import os
import signal
import subprocess
import threading
import time

import httpx
from openai import OpenAI

from conftest import (API_KEY, NO_END, ROOT, free_port, routed_model, start_server, start_worker,
                      stop_server, write_config)

TOKEN = "wk-reload-token"
ADMIN = "adm-worker-reload"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MB = 1 << 20


def worker_file(kv_mb: int, model: str = "wk") -> str:
    return (
        f'[models."{model}"]\n'
        f'source = {{ path = "{GGUF}" }}\n'
        f'backend = {{ type = "local", kv_cache_bytes = {kv_mb * MB}, max_queue = 64 }}\n'
    )


def worker_models(port: int) -> dict:
    r = httpx.get(f"http://127.0.0.1:{port}/admin/v1/models",
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def ask(client) -> None:
    r = client.chat.completions.create(
        model="wk", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        logit_bias=NO_END)
    assert r.usage.completion_tokens == 4


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_worker_reloads_on_sighup_and_refuses_a_file_without_its_model():
    port = free_port()
    path = write_config("tollgate-worker-reload-", worker_file(64))
    worker, log = start_worker(port, TOKEN, model="wk", config=path,
                               extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN})
    gateway_config = write_config("tollgate-worker-reload-gw-", routed_model("wk", port))
    gateway = start_server(extra_env={"TOLLGATE_WORKER_TOKEN": TOKEN},
                           extra_args=["--config", gateway_config, "--no-database"])
    try:
        client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        ask(client)
        before = worker_models(port)["wk"]
        assert before["state"] == "loaded" and before["memory_bytes"] == GGUF.stat().st_size + 64 * MB

        # A stream on the engine in force, in flight while the worker's file changes.
        stream = client.chat.completions.create(
            model="wk", messages=[{"role": "user", "content": "Count"}], max_tokens=300,
            logit_bias=NO_END, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        with open(path, "w") as f:
            f.write(worker_file(96))
        worker.send_signal(signal.SIGHUP)
        wait_for(lambda: worker_models(port)["wk"]["memory_bytes"] == GGUF.stat().st_size + 96 * MB,
                 "SIGHUP never put the worker's new serving in force")
        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[0].completion_tokens == 300, "the stream on the old engine ended"
        ask(client)
        after = worker_models(port)["wk"]
        assert after["state"] == "loaded" and after["loads_total"] == 1, after

        # A file without the worker's model: refused with the reason, the model still served.
        with open(path, "w") as f:
            f.write(worker_file(64, model="other"))
        r = httpx.post(f"http://127.0.0.1:{port}/admin/v1/models/reload",
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert r.status_code == 400 and "no model `wk`" in r.json()["error"]["message"], r.text
        worker.send_signal(signal.SIGHUP)
        wait_for(lambda: any("SIGHUP: the catalogue is not reloaded" in line for line in log),
                 "the refused reload was never logged")
        ask(client)
        assert worker_models(port)["wk"]["memory_bytes"] == GGUF.stat().st_size + 96 * MB
    finally:
        code = stop_server(gateway)
        worker.send_signal(signal.SIGTERM)
        worker_code = worker.wait(timeout=60)
    assert code == 0, "".join(gateway.log[-40:])
    assert worker_code == 0, "".join(log[-40:])


def test_a_sighup_while_the_server_starts_does_not_end_it():
    # Kept starting by construction: its ledger database is a port nobody listens on, which
    # the server tries again with backoff, answering 503 meanwhile.
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(ROOT / "models.toml"), "--listen", "127.0.0.1:0",
         "--database", f"postgres://nobody:secret@127.0.0.1:{free_port()}/none"],
        env=dict(os.environ, RUST_LOG="info"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    log: list = []

    def pump():
        for line in proc.stderr:
            log.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        def attempts():
            return sum("cannot reach the ledger database" in line for line in log)

        wait_for(lambda: attempts() > 0, "the server never tried its database", timeout=60)
        before = attempts()
        proc.send_signal(signal.SIGHUP)
        # Not a sleep: the server's next attempt (its backoff starts at 0.5 s) shows it
        # lived on after the hangup, whose default action would have ended it at once.
        wait_for(lambda: attempts() > before or proc.poll() is not None,
                 "the server neither tried again nor ended", timeout=60)
        assert proc.poll() is None, f"SIGHUP ended the starting server: {proc.returncode}"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, "".join(log[-20:])
