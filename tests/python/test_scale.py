"""Scale-out on loopback with real processes: one gateway in front of two `tollgate worker`s
running the real model. Killing a worker under load fails no request that had not started
streaming; the gateway keeps serving on the survivor and meters what the workers report."""

import os
import re
import signal
import subprocess
import tempfile
import threading
import time

import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, ROOT, start_server, stop_server

WORKER_TOKEN = "worker-test-token"
MODEL = "smollm2-135m"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a lighthouse."},
]


def drain(proc):
    for _ in proc.stderr:
        pass


def start_worker():
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    env = dict(os.environ, TOLLGATE_WORKER_TOKEN=WORKER_TOKEN, RUST_LOG="info")
    proc = subprocess.Popen(
        [binary, "worker", "--model", MODEL, "--config", str(ROOT / "models.toml"), "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    for line in proc.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=drain, args=(proc,), daemon=True).start()
            return proc, m.group(1)
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("worker did not start")


@pytest.fixture
def cluster():
    workers = [start_worker() for _ in range(2)]
    tmp = tempfile.mkdtemp(prefix="tollgate-scale-")
    config = os.path.join(tmp, "models.toml")
    urls = ", ".join(f'"http://{addr}"' for _, addr in workers)
    with open(config, "w") as f:
        f.write(
            f'[models."{MODEL}"]\n'
            f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
            f'backend = {{ type = "http", urls = [{urls}], api_key_env = "TOLLGATE_WORKER_TOKEN" }}\n'
            'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
        )
    gw = start_server(
        {"TOLLGATE_WORKER_TOKEN": WORKER_TOKEN, "TOLLGATE_ADMIN_TOKEN": "adm"},
        ["--config", config, "--database", os.path.join(tmp, "ledger.db")],
    )
    yield gw, workers
    assert stop_server(gw) == 0
    for proc, _ in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_killing_a_worker_fails_only_requests_already_streaming(cluster):
    gw, workers = cluster
    client = OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    # Both workers answer; the gateway routes the same greedy answer whichever serves it.
    ref = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert ref.usage.completion_tokens == 16

    outcomes, lock = [], threading.Lock()

    def one(i):
        started = False
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    started = True
            ok = True
        except openai.APIError:
            ok = False
        with lock:
            outcomes.append((started, ok))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.5)
    workers[0][0].kill()  # SIGKILL one worker under load
    for t in threads:
        t.join()
    assert len(outcomes) == 12
    print('outcomes (started, ok):', outcomes)
    failed_before_streaming = [o for o in outcomes if not o[1] and not o[0]]
    assert not failed_before_streaming, outcomes
    # The survivor serves everything afterwards.
    for _ in range(4):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == ref.choices[0].message.content[: len(r.choices[0].message.content)]
        assert r.usage.prompt_tokens == ref.usage.prompt_tokens
