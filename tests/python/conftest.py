"""Starts the real `tollgate serve` (release binary, real SmolLM2 model) on an ephemeral port
for the OpenAI Python SDK tests, and stops it with SIGTERM afterwards."""

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-python"
# SmolLM2's end tokens (`<|endoftext|>` 0, `<|im_end|>` 2) banned with `logit_bias`: the request
# then runs to exactly `max_tokens`, so a test that needs a request in flight makes it long by
# construction instead of hoping the model talks long enough on this machine.
NO_END = {"0": -100, "2": -100}


class Server:
    def __init__(self, proc: subprocess.Popen, addr: str, log: list):
        self.proc = proc
        self.addr = addr
        self.base_url = f"http://{addr}/v1"
        self.log = log


def start_server(extra_env=None, extra_args=None) -> Server:
    """Starts a server; unless `extra_args` names a `--database`, its ledger is a fresh SQLite
    file in a temporary directory."""
    extra_args = list(extra_args or [])
    if "--database" not in extra_args and "--no-database" not in extra_args:
        tmp = tempfile.mkdtemp(prefix="tollgate-test-")
        extra_args += ["--database", os.path.join(tmp, "ledger.db")]
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    if not Path(binary).exists():
        raise RuntimeError(f"{binary} not found: build with `cargo build --release` first")
    env = dict(os.environ, TOLLGATE_API_KEYS=API_KEY, RUST_LOG="info")
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0"]
        + ([] if "--config" in extra_args else ["--config", str(ROOT / "models.toml")])
        + extra_args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list = []
    found = threading.Event()
    addr_box = {}

    def pump():
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"listening on (\S+)", line) or re.search(r"addr=(\S+)", line)
            if m and not found.is_set():
                addr_box["addr"] = m.group(1).strip('"')
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout=180):
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(log[-40:]))
    return Server(proc, addr_box["addr"], log)


def uncached_keys_config(directory) -> str:
    """The repository's models.toml with the API key cache's lifetimes at 0 (`[server]`
    `key_cache_fresh_ms`, `key_cache_max_age_ms`), written in `directory`; returns its path. Every
    request then looks its key up, so a key changed or revoked elsewhere (another replica, the CLI)
    is seen by the next request: nothing to wait out. The cache itself is tested in Rust, on a
    manual clock (gateway/tests/store.rs)."""
    text = (ROOT / "models.toml").read_text()
    text = re.sub(r"(?m)^key_cache_\w+ *=.*\n", "", text)
    text = text.replace("[server]\n", "[server]\nkey_cache_fresh_ms = 0\nkey_cache_max_age_ms = 0\n", 1)
    text = text.replace('path = "models/', f'path = "{ROOT}/models/')
    path = os.path.join(directory, "models.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_config(prefix: str, text: str) -> str:
    """`text` written as `models.toml` in a fresh temporary directory named from `prefix`;
    returns its path."""
    path = os.path.join(tempfile.mkdtemp(prefix=prefix), "models.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def ledger_args(kind: str, prefix: str) -> list:
    """Server arguments for a ledger of `kind`: none for `sqlite` (start_server's fresh file);
    for `postgres` a reset database with the spool and the files in a fresh temporary directory
    (skipped without TOLLGATE_TEST_POSTGRES=1)."""
    if kind != "postgres":
        return []
    if not os.environ.get("TOLLGATE_TEST_POSTGRES"):
        pytest.skip("needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)")
    from billing_common import pg

    tmp = tempfile.mkdtemp(prefix=prefix)
    return ["--database", pg("reset"), "--spool", os.path.join(tmp, "ledger.spool"),
            "--files-url", os.path.join(tmp, "files")]


def routed_model(model: str, port: int, backend_extra: str = "") -> str:
    """The catalogue entry of `model` served by the `tollgate worker` on `port`, which the
    gateway reaches with the token in `TOLLGATE_WORKER_TOKEN`; `backend_extra` adds settings
    to the backend table (`", forward_customer = true"`)."""
    return (
        f'[models."{model}"]\n'
        f'backend = {{ type = "http", urls = ["http://127.0.0.1:{port}"], api_key_env = "TOLLGATE_WORKER_TOKEN"{backend_extra} }}\n'
        'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
    )


def admin_call(srv, token, method, path, body=None, params=None):
    """`method` on the admin API (`/admin/v1{path}`) with the admin token `token`; asserts it
    succeeded and returns its JSON."""
    r = httpx.request(method, f"http://{srv.addr}/admin/v1{path}", json=body, params=params,
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code < 300, r.text
    return r.json()


def customer_keys(srv, token, customers) -> dict:
    """Creates each of `customers` with one key through the admin API; returns each one's key."""
    out = {}
    for customer in customers:
        admin_call(srv, token, "POST", "/customers", {"id": customer, "name": customer})
        out[customer] = admin_call(srv, token, "POST", f"/customers/{customer}/keys", {"name": "k"})["key"]
    return out


def run_concurrently(target, n):
    """`target(i)` for each `i` in `range(n)`, each on a thread of its own, all started before
    any is waited for."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int, token: str, model: str = "smollm2-135m", rust_log: str = "info",
                 config=None, extra_env=None):
    """A `tollgate worker` serving `model` of `config` (the repository's models.toml by
    default) on `port` for gateways that present `token`, once it listens; returns the process
    and its log lines (kept up to date)."""
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    env = dict(os.environ, TOLLGATE_WORKER_TOKEN=token, RUST_LOG=rust_log, **(extra_env or {}))
    worker = subprocess.Popen(
        [binary, "worker", "--model", model, "--config", str(config or ROOT / "models.toml"),
         "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    ready, log = threading.Event(), []

    def pump():
        for line in worker.stderr:
            log.append(line)
            if "listening on" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout=180):
        worker.kill()
        raise RuntimeError("worker did not start:\n" + "".join(log[-40:]))
    return worker, log


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    code = stop_server(srv)
    assert code == 0, "server exited with %s:\n%s" % (code, "".join(srv.log[-40:]))


@pytest.fixture(scope="session")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model() -> str:
    return "smollm2-135m"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With TOLLGATE_REQUIRE_ALL=1 (scripts/test.sh sets it) a skipped test is a failure: the
    README's test command runs every test, and a skip must never pass for a pass."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TOLLGATE_REQUIRE_ALL") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped under TOLLGATE_REQUIRE_ALL=1: {report.longrepr}"
