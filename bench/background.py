#!/usr/bin/env python3
"""How long `POST /v1/responses` with `background: true` takes to answer `queued` (issue 32,
item 7: under 50 ms at p99 on an idle server).

Starts `tollgate serve` on the repository's models.toml (a throwaway database), then creates
`--requests` background responses one after another, each waiting for the run before it to
end (polled), so every create meets an idle server. Reported: the creates' p50/p99/max in
milliseconds, and whether each ended `completed`.

    .venv/bin/python bench/background.py --bin target/release/tollgate \\
        --json bench/results/background-DATE.json [--requests 200]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import pct  # noqa: E402
from interleave import ROOT, Server  # noqa: E402
from provenance import provenance  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "tollgate"))
    p.add_argument("--json", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--note", default="", help="kept in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args()
    out = {**provenance(), "note": args.note, "settings": vars(args)}
    create_ms, statuses = [], {}
    with tempfile.TemporaryDirectory() as work:
        server = Server(args.bin, -1, work)
        try:
            key = server.key("background")
            with httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"},
                              timeout=600) as http:
                for i in range(args.requests):
                    body = {"model": "smollm2-135m", "background": True, "max_output_tokens": 8,
                            "instructions": "You are a helpful assistant.", "input": f"[{i}] Say hello."}
                    start = time.perf_counter()
                    r = http.post("/responses", json=body)
                    create_ms.append((time.perf_counter() - start) * 1e3)
                    r.raise_for_status()
                    assert r.json()["status"] == "queued", r.text
                    rid = r.json()["id"]
                    while True:
                        status = http.get(f"/responses/{rid}").json()["status"]
                        if status not in ("queued", "in_progress"):
                            statuses[status] = statuses.get(status, 0) + 1
                            break
                        time.sleep(0.02)
        finally:
            server.stop()
    out["create_ms"] = {"p50": pct(create_ms, 0.5), "p99": pct(create_ms, 0.99), "max": max(create_ms),
                        "n": len(create_ms)}
    out["ended"] = statuses
    print(json.dumps({"create_ms": out["create_ms"], "ended": statuses}), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
