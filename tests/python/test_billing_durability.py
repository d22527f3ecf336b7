"""The ledger survives what kills servers and databases: a SIGKILL right after the responses
(the spool replays), and PostgreSQL stopped in the middle of load (nothing lost, nothing twice)."""

import os
import sqlite3
import tempfile
import time

import pytest

from conftest import API_KEY, start_server, stop_server
from billing_common import ADMIN, Admin, chat, metric, pg, sdk

def test_kill9_after_responses_loses_no_record():
    tmp = tempfile.mkdtemp(prefix="tollgate-kill-")
    args = ["--database", os.path.join(tmp, "ledger.db")]
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    client = sdk(srv, API_KEY)
    ids = []
    for i in range(4):
        ids.append(chat(client, f"Quick {i}", max_tokens=4, stream=i % 2 == 1)[0])
    # The test holds the database's write lock for the last four, so their records cannot reach
    # it before the kill, however fast the machine: they exist only in the spool, and the
    # restart must replay them.
    lock = sqlite3.connect(os.path.join(tmp, "ledger.db"), timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(4, 8):
            ids.append(chat(client, f"Quick {i}", max_tokens=4, stream=i % 2 == 1)[0])
        srv.proc.kill()  # SIGKILL right after the last response completed
        srv.proc.wait()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    try:
        records = Admin(srv).wait_for(ids, timeout=30)
        assert any("replaying spooled usage records" in line for line in srv.log), "".join(srv.log[-40:])
        ledger_ids = [r["id"] for r in Admin(srv).records()]
        assert sorted(ledger_ids) == sorted(set(ledger_ids)), "no record twice"
        assert set(ids) <= set(records)
    finally:
        assert stop_server(srv) == 0



@pytest.mark.skipif(
    not os.environ.get("TOLLGATE_TEST_POSTGRES"),
    reason="needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)",
)
def test_postgres_outage_mid_load_loses_and_doubles_nothing():
    url = pg("reset")
    spool = os.path.join(tempfile.mkdtemp(prefix="tollgate-pg-"), "ledger.spool")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", url, "--spool", spool])
    try:
        admin = Admin(srv)
        admin.customer("pg-co")
        key = admin.key("pg-co")["key"]
        client = sdk(srv, key)
        ids, errors = [], []
        chat(client, "warm up", max_tokens=2)  # the key is looked up once while the database is up

        def load(n, tag):
            for i in range(n):
                try:
                    ids.append(chat(client, f"{tag} {i}", max_tokens=4, stream=i % 2 == 0)[0])
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(repr(e))

        load(5, "before")
        pg("stop")
        load(10, "during")
        assert metric(srv, "tollgate_ledger_spooled_records") > 0
        pg("start")
        load(5, "after")
        assert not errors, errors
        deadline = time.time() + 30
        while metric(srv, "tollgate_ledger_pending_records") > 0:
            assert time.time() < deadline, "spooled records never reached PostgreSQL"
            time.sleep(0.2)
        ledger_ids = [r["id"] for r in admin.records()]
        assert len(ledger_ids) == len(set(ledger_ids))
        assert set(ids) <= set(ledger_ids)
        assert len(ledger_ids) == len(ids) + 1  # plus the warm-up
    finally:
        pg("start")
        assert stop_server(srv) == 0


# ---- cached prompt tokens --------------------------------------------------------------------
