"""The soak command (`bench/soak.py`), shortened for CI: mixed traffic against a gateway in front
of a worker for a few minutes, with the worker killed and restarted and PostgreSQL stopped and
started; it exits non-zero when a usage record is lost, doubled or charged for a refused
request, when an undocumented 5xx is answered, when the engine is not idle at the end, or when
RSS grew more than 10% after warm-up.

Needs PostgreSQL (`scripts/postgres.sh`, root): skipped unless TOLLGATE_TEST_POSTGRES=1.
`SOAK_SECONDS` sets the length (default 150)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    not os.environ.get("TOLLGATE_TEST_POSTGRES"),
    reason="needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)",
)


def test_soak_loses_nothing_and_leaks_nothing(tmp_path):
    seconds = float(os.environ.get("SOAK_SECONDS", "150"))
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", str(seconds),
         "--warmup", str(seconds * 0.3), "--clients", "3", "--json", str(out), "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=seconds + 600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    figures = json.loads(out.read_text())
    assert figures["failures"] == []
    assert figures["lost"] == 0 and figures["doubled"] == 0
    # The run did what it says: traffic got through before and after both faults.
    assert figures["answered_200"] > 50, figures
    assert figures["engine_at_end"] == {"running": 0, "waiting": 0, "kv_cache_used_bytes": 0}
