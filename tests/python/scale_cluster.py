"""The cluster of `test_scale.py`: two `tollgate serve` gateways metering into one PostgreSQL
(each with its own spool) in front of two `tollgate worker`s running the real model, as
processes the tests kill, restart and wait for."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, free_port, start_server
from billing_common import ADMIN, MODEL, pg

WORKER_TOKEN = "worker-test-token"


def binary():
    return os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))


def wait_until(predicate, timeout, what):
    """Polls `predicate` until it is true; fails after `timeout` seconds (a hang guard only)."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)



def kill(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# ---- processes -------------------------------------------------------------------------------


class Worker:
    """A `tollgate worker` on a fixed port, so it can be restarted where the gateways expect it."""

    def __init__(self, port):
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.proc = None
        self.log: list = []

    def start(self):
        env = dict(os.environ, TOLLGATE_WORKER_TOKEN=WORKER_TOKEN, RUST_LOG="info")
        self.log = []
        self.proc = subprocess.Popen(
            [binary(), "worker", "--model", MODEL, "--config", str(ROOT / "models.toml"),
             "--listen", self.addr],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        ready = threading.Event()
        proc, log = self.proc, self.log

        def pump():
            for line in proc.stderr:
                log.append(line)
                if "listening on" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        return ready

    def wait_ready(self, ready):
        if not ready.wait(timeout=180):
            kill(self.proc)
            raise RuntimeError(f"worker {self.addr} did not start:\n" + "".join(self.log[-40:]))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def running(self):
        """Sequences this worker's engine is generating right now."""
        r = httpx.get(f"http://{self.addr}/health", headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
                      timeout=10)
        return sum(m["running"] for m in r.json()["models"])


class Gateway:
    """A `tollgate serve` with PostgreSQL and its own spool; restarts keep the spool (a new port)."""

    def __init__(self, name, config, database, spool):
        self.name, self.config, self.database, self.spool = name, config, database, spool
        self.server = None

    def start(self):
        self.server = start_server(
            {"TOLLGATE_WORKER_TOKEN": WORKER_TOKEN, "TOLLGATE_ADMIN_TOKEN": ADMIN},
            ["--config", self.config, "--database", self.database, "--spool", self.spool],
        )

    @property
    def proc(self):
        return self.server.proc

    @property
    def addr(self):
        return self.server.addr

    def alive(self):
        return self.server is not None and self.server.proc.poll() is None

    def log_text(self):
        return "".join(self.server.log) if self.server else ""

    def client(self, key):
        return OpenAI(base_url=self.server.base_url, api_key=key, max_retries=0, timeout=120)

    def metric(self, name):
        text = httpx.get(f"http://{self.addr}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{self.name}: no metric {name}")

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of {sig!r}")


class Cluster:
    def __init__(self, tmp, database):
        self.tmp, self.database = tmp, database
        self.workers = [Worker(free_port()) for _ in range(2)]
        self.config = os.path.join(tmp, "models.toml")
        urls = ", ".join(f'"http://{w.addr}"' for w in self.workers)
        with open(self.config, "w") as f:
            # The drain after SIGTERM is bounded by a deadline far above what the in-flight streams
            # need on a slow machine: the test checks that they finish, not how fast.
            f.write(
                '[server]\nshutdown_timeout_secs = 300\n'
                f'[models."{MODEL}"]\n'
                f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
                f'backend = {{ type = "http", urls = [{urls}], api_key_env = "TOLLGATE_WORKER_TOKEN" }}\n'
                'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
            )
        self.gateways = [
            Gateway(f"gw{i}", self.config, database, os.path.join(tmp, f"gw{i}.spool")) for i in range(2)
        ]

    # -- lifecycle --

    def start_workers(self, workers):
        events = [(w, w.start()) for w in workers]  # load the models side by side
        for w, ready in events:
            w.wait_ready(ready)

    def ensure_up(self):
        """Restarts whatever an earlier (failed) test left down, and the database."""
        pg("start")
        self.start_workers([w for w in self.workers if not w.alive()])
        for g in self.gateways:
            if not g.alive():
                g.start()

    def shutdown(self):
        """Stops everything; returns the gateways' exit codes (0: a clean SIGTERM shutdown)."""
        codes = {}
        for g in self.gateways:
            if g.alive():
                try:
                    codes[g.name] = g.stop(signal.SIGTERM, timeout=30)
                except AssertionError as e:
                    codes[g.name] = str(e)
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(signal.SIGTERM)
                try:
                    w.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    kill(w.proc)
        return codes

    def logs(self):
        out = []
        for g in self.gateways:
            out.append(f"--- {g.name} ---\n" + "".join(g.server.log[-30:] if g.server else []))
        for i, w in enumerate(self.workers):
            out.append(f"--- worker{i} ---\n" + "".join(w.log[-15:]))
        return "\n".join(out)

    # -- admin API (through a live gateway; both share the database) --

    def admin(self):
        g = next(g for g in self.gateways if g.alive())
        return httpx.Client(
            base_url=f"http://{g.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )

    def admin_post(self, http, path, body):
        """POSTs as an operator's tool would: a 503 (the database restarting, its pool's old
        connections being replaced) is retried after its Retry-After."""
        for _ in range(5):
            r = http.post(path, json=body)
            if r.status_code != 503:
                return r
            time.sleep(float(r.headers.get("retry-after", "1")))
        return r

    def customer_key(self, cid):
        with self.admin() as http:
            r = self.admin_post(http, "/admin/v1/customers", {"id": cid, "name": cid})
            assert r.status_code == 201, f"{r.text}\n{self.logs()}"
            r = self.admin_post(http, f"/admin/v1/customers/{cid}/keys", {"name": "scale"})
            assert r.status_code == 201, f"{r.text}\n{self.logs()}"
            return r.json()["key"]

    def records(self, cid):
        """All ledger records of customer `cid` (every page)."""
        out, cursor = [], None
        with self.admin() as http:
            while True:
                params = {"limit": 500}
                if cursor:
                    params["after"] = cursor
                r = http.get("/admin/v1/usage/records", params=params)
                assert r.status_code == 200, r.text
                page = r.json()
                out += page["data"]
                if not page["data"]:
                    return [rec for rec in out if rec["customer_id"] == cid]
                cursor = page["next_cursor"]

    def wait_drained(self, timeout=60):
        """Until no gateway holds a record that is not yet in the database."""
        def drained():
            return all(g.metric("tollgate_ledger_pending_records") == 0 for g in self.gateways)

        wait_until(drained, timeout, "the gateways' pending usage records to reach PostgreSQL")


@pytest.fixture(scope="module")
def cluster():
    url = pg("reset")
    tmp = tempfile.mkdtemp(prefix="tollgate-scale-")
    c = Cluster(tmp, url)
    codes = {}
    try:
        c.start_workers(c.workers)
        for g in c.gateways:
            g.start()
        yield c
    finally:
        try:
            codes = c.shutdown()
        finally:
            for g in c.gateways:
                kill(g.proc if g.server else None)
            for w in c.workers:
                kill(w.proc)
            shutil.rmtree(tmp, ignore_errors=True)
            pg("start")
    assert all(code == 0 for code in codes.values()), f"gateway exit codes {codes}\n{c.logs()}"

