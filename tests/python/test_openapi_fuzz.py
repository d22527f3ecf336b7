"""The published contract, fuzzed: Schemathesis generates requests from `GET /openapi.json` and
sends them to the real server with the real model (public and admin API, valid and invalid
data), and checks every answer: no 5xx, the status code, content type, headers and body all
documented. The run is bounded (`FUZZ_MAX_EXAMPLES` cases per operation and phase, a fixed
seed) and must reach `FUZZ_MIN_CASES` cases in all; generation is held to a few tokens by
`schemathesis_hooks.py`. Afterwards the server must still be up and answer normally."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from conftest import API_KEY, ROOT, start_server, stop_server

ADMIN = "admin-fuzz-token"
MODEL = "smollm2-135m"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "100"))
MIN_CASES = int(os.environ.get("FUZZ_MIN_CASES", "1000"))
MIN_SERVED = int(os.environ.get("FUZZ_MIN_SERVED", "20"))
GENERATION = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_schemathesis_finds_no_5xx_and_every_response_conforms():
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN})
    try:
        base = f"http://{srv.addr}"
        doc = httpx.get(f"{base}/openapi.json", timeout=30).json()
        assert doc["openapi"].startswith("3.1")
        # The customer the hooks aim admin paths at (not the fuzzing key's own, whose limits
        # the fuzzer would otherwise set to 1 request a minute), with a key.
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert admin.post("/admin/v1/customers", json={"id": "fuzz-target"}).status_code == 201
        assert admin.post("/admin/v1/customers/fuzz-target/keys", json={"name": "k"}).status_code == 201
        report_dir = Path(tempfile.mkdtemp(prefix="tollgate-fuzz-"))
        report = report_dir / "run.json"
        env = dict(
            os.environ,
            SCHEMATHESIS_HOOKS="schemathesis_hooks",
            PYTHONPATH=str(Path(__file__).parent),
            FUZZ_MODEL=MODEL,
            FUZZ_API_KEY=API_KEY,
            FUZZ_ADMIN_TOKEN=ADMIN,
            FUZZ_CUSTOMER="fuzz-target",
        )
        started = time.monotonic()
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{base}/openapi.json",
                "--url",
                base,
                "--checks",
                CHECKS,
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                "20240622",
                # One worker: Hypothesis's lambda introspection is not thread-safe on Python 3.11.
                "--workers",
                "1",
                "--request-timeout",
                "120",
                "--suppress-health-check",
                "all",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            cwd=report_dir,  # its `.schemathesis` cache goes there, not into the work tree
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,  # a hang guard: the slowed engine (scalar kernels) takes longer
        )
        elapsed = time.monotonic() - started
        output = run.stdout + run.stderr
        print(output[-6000:])
        summary = json.loads(report.read_text()) if report.exists() else {}
        cases = total_cases(summary)
        served = {op: accepted(summary, op) for op in GENERATION}
        print(f"schemathesis: {cases} cases in {elapsed:.0f} s, exit {run.returncode}; accepted: {served}")
        assert run.returncode == 0, output[-12000:]
        assert cases >= MIN_CASES, f"only {cases} cases generated:\n{output[-4000:]}"
        # The fuzzing reached the models, not only the validation.
        for op, n in served.items():
            assert n >= MIN_SERVED, f"{op}: only {n} generated requests were served:\n{output[-4000:]}"
        # No crash: still serving, and a normal request still works.
        assert srv.proc.poll() is None, "".join(srv.log[-40:])
        assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        # (With a fresh customer's key: the fuzzer may have set any limits on the others.)
        assert admin.post("/admin/v1/customers", json={"id": "after-fuzz"}).status_code == 201
        key = admin.post("/admin/v1/customers/after-fuzz/keys", json={"name": "k"}).json()["key"]
        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    finally:
        code = stop_server(srv)
    assert code == 0, "server exited with %s:\n%s" % (code, "".join(srv.log[-40:]))


def total_cases(summary) -> int:
    """The number of test cases the JSON report counts."""
    return summary.get("test_cases", {}).get("generated", 0)


def accepted(summary, operation) -> int:
    """Cases of `operation` the server accepted (2xx), over all phases."""
    rates = summary.get("valid_rates", {}).get(operation, {})
    return sum(phase.get("accepted", 0) for phase in rates.values())
