"""A 500-line batch run by two gateways sharing PostgreSQL, in front of two `tollgate worker`s
(test_scale's cluster), survives a worker and a gateway SIGKILLed while its lines run: 500
output lines, 500 charged records, no line charged twice. The lines the dead worker was
generating failed on our side: their records are uncharged and they run again under a retry's
request id; the lines the dead gateway held run again once their lease lapses, under their own
id, so a record it had already spooled is the only one. Needs PostgreSQL
(TOLLGATE_TEST_POSTGRES=1)."""

import json
import signal
import subprocess
import tempfile
from decimal import Decimal

from openai import OpenAI

from conftest import NO_END
from test_batch_runs import ended, file_lines
from test_batches import CHAT, MODEL, jsonl, line, validated
from billing_common import SYSTEM, pg
from scale_cluster import cluster, wait_until  # noqa: F401 (`cluster` is the fixture)
from test_scale import pytestmark  # noqa: F401 (skipped without PostgreSQL, as test_scale)

LINES = 500
CUSTOMER = "batch-kill"
#: A short lease, so the lines of the killed gateway run again soon after it died.
LEASE_SECS = 5


def psql(sql: str) -> str:
    return subprocess.run(["psql", pg("url"), "-tAc", sql], capture_output=True, text=True,
                          check=True).stdout.strip()


def with_short_leases(cluster, monkeypatch):
    """Both gateways restarted with `batch_lease_secs` short and one directory for the files."""
    with open(cluster.config) as f:
        text = f.read()
    with open(cluster.config, "w") as f:
        f.write(text.replace("[server]\n", f"[server]\nbatch_lease_secs = {LEASE_SECS}\n", 1))
    monkeypatch.setenv("TOLLGATE_FILES_URL", tempfile.mkdtemp(prefix="tollgate-batch-kill-files-"))
    for g in cluster.gateways:
        assert g.stop(signal.SIGTERM) == 0, cluster.logs()
        g.start()


def test_a_batch_loses_no_line_and_charges_none_twice_when_a_worker_and_a_gateway_die(cluster, monkeypatch):
    with_short_leases(cluster, monkeypatch)
    front, victim = cluster.gateways
    key = cluster.customer_key(CUSTOMER)
    client = OpenAI(base_url=front.server.base_url, api_key=key, max_retries=0, timeout=120)
    # Long enough (the end tokens banned) that a killed worker is mid-answer on some lines.
    lines = [line(f"l{i}", {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": f"Count to {i}."}],
                            "max_tokens": 24, "temperature": 0, "logit_bias": NO_END})
             for i in range(LINES)]
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch_id = validated(client, client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                                       completion_window="24h").id).id

    def completed(at_least):
        return lambda: client.batches.retrieve(batch_id).request_counts.completed >= at_least

    # A worker dies while it generates lines; it is back a little later, where the gateways
    # expect it.
    dead_worker = cluster.workers[0]
    wait_until(completed(25), 600, "25 lines done")
    wait_until(lambda: dead_worker.running() > 0, 600, "the worker to generate lines")
    dead_worker.proc.kill()
    dead_worker.proc.wait(timeout=30)
    cluster.start_workers([dead_worker])
    # Then a gateway dies with the lines it claimed in flight (both gateways run as many as
    # they may while the batch has lines left); it restarts on its spool, as a pod would.
    wait_until(completed(150), 600, "150 lines done")
    assert victim.metric("tollgate_batch_lines_finished_total") > 0, "the victim ran no line"
    victim.stop(signal.SIGKILL)
    victim.start()

    batch = ended(client, batch_id)
    assert batch.status == "completed", (batch, cluster.logs())
    assert batch.request_counts.completed == batch.request_counts.total == LINES, batch.request_counts
    assert batch.request_counts.failed == 0, batch.request_counts
    assert batch.error_file_id is None
    out = file_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"l{i}" for i in range(LINES))
    assert all(o["response"]["status_code"] == 200 for o in out)

    cluster.wait_drained()
    records = cluster.records(CUSTOMER)
    charged = [r for r in records if r["status"] in ("completed", "cancelled")]
    assert sorted(r["id"] for r in charged) == sorted(o["response"]["request_id"] for o in out)
    assert len({r["id"] for r in charged}) == LINES
    assert all(r["batch_id"] == batch_id and r["service_tier"] == "batch" for r in records)
    # What else is there: the runs the dead worker failed, recorded and never charged.
    failed = [r for r in records if r not in charged]
    assert all(r["status"] == "failed" and Decimal(r["cost_usd"]) == 0 for r in failed), failed
    rerun = int(psql(f"SELECT COUNT(*) FROM batch_lines WHERE batch_id = '{batch_id}' AND attempts > 1"))
    retried = int(psql(f"SELECT COALESCE(SUM(retries), 0) FROM batch_lines WHERE batch_id = '{batch_id}'"))
    assert rerun > 0, "no line ran twice: the kills hit nothing"
    print(json.dumps({"lines_run_again": rerun, "retries": retried, "failed_records": len(failed)}))
