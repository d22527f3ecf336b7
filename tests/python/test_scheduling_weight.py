"""Per-customer scheduling weights (`scheduling_weight`, 1 to 100, default 1): set through the
admin API and the CLI, validated with 400s naming the field, and carried with each request to
the engine, which shares a model between competing customers in proportion to their weights
(the weighted fair queueing itself is unit-tested in runtime/src/fair.rs). A gateway whose
http backend sets `forward_customer` sends each request's customer and weight to its
`tollgate worker`s, which trust them only from the holder of their token."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, free_port, routed_model, start_server, start_worker, stop_server, write_config

ADMIN = "weight-admin-token"
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def srv():
    tmp = tempfile.mkdtemp(prefix="tollgate-weight-")
    db = os.path.join(tmp, "ledger.db")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN, "RUST_LOG": "info,tollgate_runtime::engine=debug"},
                     ["--database", db])
    s.db = db
    s.admin = httpx.Client(base_url=f"http://{s.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    yield s
    assert stop_server(s) == 0


def test_the_weight_is_set_read_changed_and_validated(srv):
    r = srv.admin.post("/admin/v1/customers", json={"id": "gold-co", "scheduling_weight": 4})
    assert r.status_code == 201, r.text
    assert r.json()["scheduling_weight"] == 4
    r = srv.admin.post("/admin/v1/customers", json={"id": "plain-co"})
    assert r.json()["scheduling_weight"] == 1, "the default is an equal share"
    r = srv.admin.patch("/admin/v1/customers/gold-co", json={"scheduling_weight": 6})
    assert r.status_code == 200 and r.json()["scheduling_weight"] == 6, r.text
    assert srv.admin.get("/admin/v1/customers/gold-co").json()["scheduling_weight"] == 6
    listed = {c["id"]: c for c in srv.admin.get("/admin/v1/customers").json()["data"]}
    assert listed["gold-co"]["scheduling_weight"] == 6 and listed["plain-co"]["scheduling_weight"] == 1
    for bad in [0, 101, -1, 2.5, "3", None, True]:
        r = srv.admin.patch("/admin/v1/customers/gold-co", json={"scheduling_weight": bad})
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == "scheduling_weight" and "1 to 100" in err["message"], err
    assert srv.admin.get("/admin/v1/customers/gold-co").json()["scheduling_weight"] == 6
    # The change is audited.
    audit = srv.admin.get("/admin/v1/audit", params={"limit": 100}).json()["data"]
    changes = [e["changes"] for e in audit if e["action"] == "customer.updated" and e["target"]["id"] == "gold-co"]
    assert {"scheduling_weight": {"from": 4, "to": 6}} in changes, changes


def test_the_cli_sets_it_and_refuses_out_of_range_values(srv):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    db = ["--database", srv.db]

    def cli(*args):
        return subprocess.run([binary, *args, *db], capture_output=True, text=True)

    r = cli("customers", "create", "cli-weighted", "--scheduling-weight", "7")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scheduling_weight"] == 7
    r = cli("customers", "update", "cli-weighted", "--scheduling-weight", "0")
    assert r.returncode != 0 and "scheduling-weight" in r.stderr, r.stderr
    r = cli("customers", "update", "cli-weighted", "--scheduling-weight", "2")
    assert r.returncode == 0 and json.loads(r.stdout)["scheduling_weight"] == 2, r.stderr


def test_each_request_reaches_the_engine_with_its_customers_weight(srv):
    r = srv.admin.post("/admin/v1/customers", json={"id": "heavy-co", "scheduling_weight": 9})
    assert r.status_code == 201, r.text
    key = srv.admin.post("/admin/v1/customers/heavy-co/keys", json={"name": "k"}).json()["key"]
    client = OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, max_tokens=2,
                                   messages=[{"role": "user", "content": "Hi"}])
    deadline = time.time() + 10
    admitted = []
    while time.time() < deadline:
        plain = (re.sub(r"\x1b\[[0-9;]*m", "", line) for line in srv.log)
        admitted = [line for line in plain if "admitted a sequence" in line and "heavy-co" in line]
        if admitted:
            break
        time.sleep(0.1)
    assert admitted and "weight=9" in admitted[0], admitted or srv.log[-20:]


def plain_log(lines):
    return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines]


def admitted_for(log, customer, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [line for line in plain_log(log) if "admitted a sequence" in line and f"tenant={customer} " in line]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_an_embedded_server_ignores_forwarded_customer_headers(srv):
    r = srv.admin.post("/admin/v1/customers", json={"id": "honest-co", "scheduling_weight": 2})
    key = srv.admin.post("/admin/v1/customers/honest-co/keys", json={"name": "k"}).json()["key"]
    http = httpx.Client(base_url=f"http://{srv.addr}", timeout=120, headers={
        "Authorization": f"Bearer {key}", "x-tollgate-customer": "forged-co", "x-tollgate-scheduling-weight": "100"})
    r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    mine = admitted_for(srv.log, "honest-co")
    assert mine and "weight=2" in mine[0], mine
    # The request's one admission is the line just found, for honest-co: no line names the
    # forged customer (nothing to wait for, the line that would have named it is in).
    forged = [line for line in plain_log(srv.log) if "admitted a sequence" in line and "forged-co" in line]
    assert not forged, forged



@pytest.fixture(scope="module")
def routed():
    """A gateway (with customers) whose model is served by a `tollgate worker` it forwards
    customers to."""
    port = free_port()
    worker, log = start_worker(port, "wtok", rust_log="info,tollgate_runtime::engine=debug")
    config = write_config("tollgate-forward-", routed_model(MODEL, port, ", forward_customer = true"))
    gateway = start_server({"TOLLGATE_WORKER_TOKEN": "wtok", "TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--config", config])
    gateway.admin = httpx.Client(base_url=f"http://{gateway.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    gateway.worker_log, gateway.worker_port = log, port
    yield gateway
    assert stop_server(gateway) == 0
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)


def test_a_gateway_forwards_each_requests_customer_and_weight_to_its_worker(routed):
    r = routed.admin.post("/admin/v1/customers", json={"id": "fwd-co", "scheduling_weight": 5})
    assert r.status_code == 201, r.text
    key = routed.admin.post("/admin/v1/customers/fwd-co/keys", json={"name": "k"}).json()["key"]
    # The gateway probes its members every second: retry until the worker is in rotation.
    client = OpenAI(base_url=routed.base_url, api_key=key, max_retries=5, timeout=120)
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    seen = admitted_for(routed.worker_log, "fwd-co")
    assert seen and "weight=5" in seen[0], seen or plain_log(routed.worker_log[-20:])
    # The worker checks what it is told, naming the header.
    worker = httpx.Client(base_url=f"http://127.0.0.1:{routed.worker_port}", timeout=60,
                          headers={"Authorization": "Bearer wtok"})
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    r = worker.post("/v1/chat/completions", json=body, headers={"x-tollgate-scheduling-weight": "0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tollgate-scheduling-weight", r.text
    r = worker.post("/v1/chat/completions", json=body, headers={"x-tollgate-customer": "no spaces"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tollgate-customer", r.text
