"""What the billing tests share (`test_billing*.py`, `test_replicas.py`): the admin client, the
SDK helpers that return a request's id and usage, the server with a ledger (`billing`), the CLI,
PostgreSQL's script and the metrics."""

import os
import subprocess
import tempfile
import time

import httpx
import pytest
from openai import OpenAI

from conftest import NO_END, ROOT, start_server, stop_server, uncached_keys_config

ADMIN = "admin-test-token"
MODEL = "smollm2-135m"
# models.toml prices smollm2-135m at 0.05 / 0.10 USD per million tokens: 50 and 100 nano-USD.
IN_NANO, OUT_NANO = 50, 100
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def ask(text):
    return [SYSTEM, {"role": "user", "content": text}]


def nano(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])


class Admin:
    def __init__(self, server):
        self.http = httpx.Client(
            base_url=f"http://{server.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )

    def call(self, method, path, expect=200, **kw):
        r = self.http.request(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def customer(self, cid, **fields):
        return self.call("POST", "/admin/v1/customers", 201, json={"id": cid, "name": cid, **fields})

    def key(self, cid, **fields):
        return self.call("POST", f"/admin/v1/customers/{cid}/keys", 201, json={"name": "k", **fields})

    def records(self):
        out, cursor = [], None
        while True:
            params = {"limit": 500}
            if cursor:
                params["after"] = cursor
            page = self.call("GET", "/admin/v1/usage/records", params=params)
            out += page["data"]
            if not page["data"]:
                return out
            cursor = page["next_cursor"]

    def wait_for(self, ids, timeout=30):
        """The records of these request ids, once all are in the database."""
        deadline = time.time() + timeout
        while True:
            by_id = {r["id"]: r for r in self.records()}
            if all(i in by_id for i in ids):
                return by_id
            if time.time() > deadline:
                missing = [i for i in ids if i not in by_id]
                raise AssertionError(f"records never arrived: {missing}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def billing():
    tmp = tempfile.mkdtemp(prefix="tollgate-billing-")
    db = os.path.join(tmp, "ledger.db")
    # Keys changed through the CLI (another process) are seen by the next request.
    config = uncached_keys_config(tmp)
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--config", config, "--database", db])
    srv.db = db
    yield srv
    code = stop_server(srv)
    assert code == 0, "server exited with %s:\n%s" % (code, "".join(srv.log[-40:]))


def sdk(server, key):
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def chat(client, text, max_tokens=12, stream=False, **kw):
    """One chat request; returns (request id, usage seen by the client, content chunks)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(text), max_tokens=max_tokens, temperature=0, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}), **kw
    )
    rid = raw.headers["x-request-id"]
    if not stream:
        r = raw.parse()
        return rid, (r.usage.prompt_tokens, r.usage.completion_tokens), None
    usage, chunks = None, 0
    for chunk in raw.parse():
        if chunk.usage:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
    return rid, usage, chunks


def cancelled_stream(client, text, after=3):
    """Streams, reads `after` content chunks, then hangs up. Returns (request id, chunks)."""
    # 2,000 tokens with the end tokens banned: still generating when the client hangs up, on any
    # machine (the hang-up is noticed within a step; the rest would take seconds at any speed).
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(text), max_tokens=2000, temperature=0, stream=True,
        logit_bias=NO_END,
    )
    rid = raw.headers["x-request-id"]
    stream = raw.parse()
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == after:
                break
    stream.close()
    return rid, seen



def tollgate(*args, **kw):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    return subprocess.run([binary, *args], capture_output=True, text=True, check=True, **kw)



def pg(cmd):
    return subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), cmd], capture_output=True, text=True, check=True
    ).stdout.strip()


def metric(server, name):
    text = httpx.get(f"http://{server.addr}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")

