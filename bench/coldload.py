#!/usr/bin/env python3
"""How long a model takes to load on demand through `tollgate serve` (issue 34, item 1: a
1B-parameter Q8_0 GGUF loads cold in <= 1 s), and whether an unloaded model's memory goes.

The model is the Llama-3.2-1B-shaped random Q8_0 GGUF that runtime/examples/large_model.rs
writes (`cargo run --release -p tollgate-runtime --example large_model -- q8_0 auto` puts it
at $TMPDIR/tollgate-large-llama-q8_0.gguf). Two model ids on that file share a
`model_memory_bytes` with room for one, so every request that alternates between them unloads
one and loads the other. Each load is measured twice over: the server's own `load_seconds`
(`GET /admin/v1/models`: weights read and converted, engine started) and the wall time of the
one-token request that caused it, beside the same request once the model is loaded. With
`--from-disk` the file's pages are dropped from the page cache before each load
(`posix_fadvise(DONTNEED)`, this file only), so the weights come from the disk. The server's
RSS after each load says whether the unloaded model's memory was reused, and its RSS once
both models are unloaded (a keep-alive of 1 s reloaded in) whether it was given back.

    .venv/bin/python bench/coldload.py --bin target/release/tollgate \\
        --json bench/results/coldload-DATE.json [--loads 6] [--from-disk]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleave import free_port, wait_healthy  # noqa: E402
from provenance import ROOT, provenance  # noqa: E402

ADMIN = "adm-coldload"
KEY = "sk-coldload"
KV = 256 << 20


def catalogue(gguf, size, extra=""):
    entry = ('[models."{id}"]\nsource = {{ path = "{gguf}" }}\n'
             'backend = {{ type = "local", weights = "auto", kv_cache_bytes = {kv} }}\n{extra}')
    return (f"[server]\nmodel_memory_bytes = {size + KV + (1 << 20)}\n\n"
            + entry.format(id="big-a", gguf=gguf, kv=KV, extra=extra) + "\n"
            + entry.format(id="big-b", gguf=gguf, kv=KV, extra=extra))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_token(http, model):
    start = time.perf_counter()
    r = http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1})
    r.raise_for_status()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "tollgate"))
    p.add_argument("--gguf", default=os.path.join(tempfile.gettempdir(), "tollgate-large-llama-q8_0.gguf"))
    p.add_argument("--json", required=True)
    p.add_argument("--loads", type=int, default=6)
    p.add_argument("--from-disk", action="store_true", help="drop the file from the page cache before each load")
    p.add_argument("--server-log", help="keep the server's log here (RUST_LOG=info shows each load's parts)")
    p.add_argument("--note", default="", help="kept in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args()
    if not os.path.isfile(args.gguf):
        sys.exit(f"{args.gguf} not found: run the large_model example first (see this file's doc)")
    size = os.path.getsize(args.gguf)
    out = {**provenance(), "note": args.note, "settings": vars(args), "file_bytes": size,
           "load_before": os.getloadavg(), "loads": []}
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        config = os.path.join(work, "models.toml")
        with open(config, "w") as f:
            f.write(catalogue(args.gguf, size))
        log = open(args.server_log or os.path.join(work, "serve.log"), "w")
        env = {**os.environ, "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_API_KEYS": KEY, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        proc = subprocess.Popen([args.bin, "serve", "--config", config, "--no-database",
                                 "--listen", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base, tries=1200, pause=0.1)
            out["rss_one_loaded_at_start"] = rss_bytes(proc.pid)
            admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600)
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
                one_token(http, "big-a")
                for i in range(args.loads):
                    model = ["big-b", "big-a"][i % 2]
                    if args.from_disk:
                        drop_from_page_cache(args.gguf)
                    cold = one_token(http, model)
                    warm = one_token(http, model)
                    row = {m["id"]: m for m in admin.get("/admin/v1/models").json()["data"]}[model]
                    out["loads"].append({"model": model, "load_seconds": row["load_seconds"],
                                         "request_cold_seconds": cold, "request_warm_seconds": warm,
                                         "rss_bytes": rss_bytes(proc.pid)})
                    print(json.dumps(out["loads"][-1]), flush=True)
            # Both idle past a keep-alive of 1 s (reloaded in): what the process keeps with
            # no model loaded.
            with open(config, "w") as f:
                f.write(catalogue(args.gguf, size, extra="keep_alive_secs = 1\n"))
            admin.post("/admin/v1/models/reload").raise_for_status()
            for _ in range(100):
                rows = admin.get("/admin/v1/models").json()["data"]
                if all(m["state"] == "unloaded" for m in rows):
                    break
                time.sleep(0.1)
            time.sleep(1)
            out["rss_none_loaded"] = rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()
    loads = [r["load_seconds"] for r in out["loads"]]
    out["load_seconds_median"] = statistics.median(loads)
    out["load_seconds_max"] = max(loads)
    out["request_added_seconds_median"] = statistics.median(
        r["request_cold_seconds"] - r["request_warm_seconds"] for r in out["loads"])
    out["rss_max_bytes"] = max(r["rss_bytes"] for r in out["loads"])
    out["load_after"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("file_bytes", "rss_one_loaded_at_start", "load_seconds_median",
                                          "load_seconds_max", "request_added_seconds_median", "rss_max_bytes",
                                          "rss_none_loaded")}))


if __name__ == "__main__":
    main()
