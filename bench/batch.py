#!/usr/bin/env python3
"""The Batch API on idle capacity (issue 32, item 3): what a batch in progress costs an
interactive tenant, and how much of the engine a batch gets when nobody else wants it.

Starts `tollgate serve` on the repository's models.toml (a throwaway database; customers made
through the admin API) and runs, on that one server:

1. `idle`: the interactive tenant alone, `--streams` streams one request after another, each of
   `--tokens` tokens (end tokens banned, so every request does the same work), for
   `--duration` seconds: its TTFT p50/p99 and tok/s.
2. `saturated`: one tenant with `--saturate` streams of the same requests: the engine's tok/s
   when one tenant saturates it.
3. `batch_alone`: a batch of `--alone-lines` such lines and nothing else: its output tok/s from
   the moment it is `in_progress` to the moment it is `completed` (polled every 0.2 s).
4. `beside_batch`: a batch of `--lines` lines is created; once it is `in_progress`, phase 1
   again. The batch must still be in progress when the phase ends (else its figures are
   refused), and is then cancelled.

Goals: the interactive tenant's TTFT p99 beside the batch <= 1.2x idle and its tok/s >= 0.95x
idle; the batch alone >= 0.9x the saturated engine.

    .venv/bin/python bench/batch.py --bin target/release/tollgate \\
        --json bench/results/batch-DATE.json [--duration 40] [--lines 1000]
"""

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402
from interleave import ROOT, Server  # noqa: E402
from provenance import provenance  # noqa: E402

MODEL = "smollm2-135m"
#: SmolLM2's end tokens, banned: every request runs to its `max_tokens`.
NO_END = "0,2"


def request_args(args):
    """bench/load.py's request settings for this workload."""
    return argparse.Namespace(model=MODEL, temperature=0.0, ignore_eos=False, ban_tokens=NO_END,
                              max_tokens=args.tokens, system_tokens=args.system_tokens, prompt_tokens=0)


async def streams(server, key, args, n, duration, first_index):
    """`n` streams of requests one after another for `duration` seconds: TTFTs, tokens, wall."""
    req = request_args(args)
    ttfts, tokens, errors = [], [0], []
    stop_at = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"},
                                 timeout=600, limits=httpx.Limits(max_connections=n + 4)) as client:
        async def one(s):
            i = first_index + s * 100_000
            while time.perf_counter() < stop_at:
                try:
                    r = await load.one_request(client, req, i, True)
                    ttfts.append(r["ttft"])
                    tokens[0] += r["tokens"]
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    errors.append(str(e))
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(s) for s in range(n)))
        wall = time.perf_counter() - start
    return {"streams": n, "requests": len(ttfts), "tok_per_s": tokens[0] / wall,
            "ttft_p50_ms": load.pct(ttfts, 0.5) * 1e3, "ttft_p99_ms": load.pct(ttfts, 0.99) * 1e3,
            "errors": len(errors), "error_samples": errors[:3]}


class Batches:
    """The Files and Batches API as one customer."""

    def __init__(self, server, key):
        self.http = httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"},
                                 timeout=600)

    def create(self, args, lines, tag):
        req = request_args(args)
        body = io.BytesIO()
        for i in range(lines):
            msgs = load.messages(req, 1_000_000 + i, True)
            line = {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {**load.chat_body(req, MODEL, msgs, args.tokens), "stream": False}}
            line["body"].pop("stream_options")
            body.write((json.dumps(line) + "\n").encode())
        f = self.http.post("/files", files={"file": (f"{tag}.jsonl", body.getvalue())}, data={"purpose": "batch"})
        f.raise_for_status()
        b = self.http.post("/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
        b.raise_for_status()
        return b.json()["id"]

    def get(self, batch_id):
        r = self.http.get(f"/batches/{batch_id}")
        r.raise_for_status()
        return r.json()

    def wait(self, batch_id, until, deadline=3600):
        end = time.time() + deadline
        while time.time() < end:
            b = self.get(batch_id)
            if b["status"] in until:
                return b
            if b["status"] in ("failed", "expired", "cancelled", "completed"):
                raise RuntimeError(f"batch {batch_id} ended {b['status']}: {b.get('errors')}")
            time.sleep(0.2)
        raise RuntimeError(f"batch {batch_id} still not {until}")


def batch_alone(batches, args):
    batch_id = batches.create(args, args.alone_lines, "alone")
    batches.wait(batch_id, ("in_progress",))
    start = time.perf_counter()
    b = batches.wait(batch_id, ("completed",))
    wall = time.perf_counter() - start
    counts = b["request_counts"]
    tokens = (b.get("usage") or {}).get("output_tokens")
    if tokens is None:
        tokens = counts["completed"] * args.tokens
    return {"lines": args.alone_lines, "completed": counts["completed"], "failed": counts["failed"],
            "output_tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall}


def beside_batch(server, batches, key, args):
    batch_id = batches.create(args, args.lines, "big")
    batches.wait(batch_id, ("in_progress",))
    before = batches.get(batch_id)["request_counts"]
    run = asyncio.run(streams(server, key, args, args.streams, args.duration, 2_000_000))
    after = batches.get(batch_id)
    run["batch"] = {"lines": args.lines, "status_at_end": after["status"],
                    "lines_done_during": after["request_counts"]["completed"] - before["completed"]}
    if after["status"] != "in_progress":
        raise RuntimeError(f"the batch was {after['status']} before the phase ended: use more --lines")
    batches.http.post(f"/batches/{batch_id}/cancel").raise_for_status()
    batches.wait(batch_id, ("cancelled",))
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "tollgate"))
    p.add_argument("--json", required=True)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of each interactive phase")
    p.add_argument("--streams", type=int, default=4, help="the interactive tenant's streams")
    p.add_argument("--saturate", type=int, default=32, help="streams of the saturating tenant")
    p.add_argument("--tokens", type=int, default=64, help="tokens of every request and line")
    p.add_argument("--system-tokens", type=int, default=0, help="a system prompt of about this many tokens")
    p.add_argument("--lines", type=int, default=1000, help="lines of the batch beside the tenant")
    p.add_argument("--alone-lines", type=int, default=300, help="lines of the batch run alone")
    p.add_argument("--note", default="", help="kept in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args()
    out = {**provenance(), "note": args.note, "settings": vars(args), "phases": {}}
    with tempfile.TemporaryDirectory() as work:
        server = Server(args.bin, -1, work)
        try:
            interactive, saturating, batcher = server.key("interactive"), server.key("saturating"), server.key("batcher")
            batches = Batches(server, batcher)
            phases = out["phases"]
            phases["idle"] = asyncio.run(streams(server, interactive, args, args.streams, args.duration, 0))
            print("idle", json.dumps(phases["idle"]), flush=True)
            phases["saturated"] = asyncio.run(streams(server, saturating, args, args.saturate, args.duration, 1))
            print("saturated", json.dumps(phases["saturated"]), flush=True)
            phases["batch_alone"] = batch_alone(batches, args)
            print("batch_alone", json.dumps(phases["batch_alone"]), flush=True)
            phases["beside_batch"] = beside_batch(server, batches, interactive, args)
            print("beside_batch", json.dumps(phases["beside_batch"]), flush=True)
        finally:
            server.stop()
    idle, beside = out["phases"]["idle"], out["phases"]["beside_batch"]
    errors = sum(ph.get("errors", 0) for ph in out["phases"].values()) + out["phases"]["batch_alone"]["failed"]
    if errors:
        print(f"{errors} errors: no ratio printed", flush=True)
    else:
        out["ratios"] = {
            "interactive_ttft_p99_over_idle": beside["ttft_p99_ms"] / idle["ttft_p99_ms"],
            "interactive_tok_per_s_of_idle": beside["tok_per_s"] / idle["tok_per_s"],
            "batch_alone_of_saturated": out["phases"]["batch_alone"]["tok_per_s"] / out["phases"]["saturated"]["tok_per_s"],
        }
        print(json.dumps(out["ratios"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
