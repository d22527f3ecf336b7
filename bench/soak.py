#!/usr/bin/env python3
"""Soak: mixed traffic for a bounded time against a gateway in front of a worker, with faults.

Starts PostgreSQL (`scripts/postgres.sh`, root), one `tollgate worker` on the real model and one
`tollgate serve` gateway that routes to it and meters into PostgreSQL, issues keys through the
admin API, then for `--duration` seconds runs `--clients` client threads that each loop over a
mix of requests:

- chat completions streamed and not, text completions, cancellations (a stream closed after its
  first chunks), bad requests (a field out of range: 400), and a key with a tiny rate limit
  (429);
- at a third of the run the worker is killed (SIGKILL) and restarted; at two thirds PostgreSQL
  is stopped for a few seconds and started again.

At the end it checks and prints:

- the ledger: every request answered 200 has exactly one usage record, no record is doubled,
  and a record of a request answered otherwise is a `failed` one (it reached the model before
  the fault); none is lost;
- the gateway's RSS at the end within 10% of its RSS after warm-up (`--warmup` seconds), and the
  worker's within 10% of its RSS after warm-up following its restart;
- the worker's engine idle again: no running or waiting sequence, no KV cache in use;
- no 5xx other than the documented 503 (a member down, the database restarting) and 502 (the
  upstream failed mid-request).

Exit status 0 when every check holds. The figures are printed and, with `--json`, written.

    sudo bench/soak.py --bin target/release/tollgate [--duration 1200] [--clients 6]

CI runs it shortened (tests/python/test_soak.py).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
WORKER_TOKEN = "soak-worker-token"
ADMIN = "soak-admin-token"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Give me a word that rhymes with cat.",
]
# Statuses a fault may produce and the API documents: the database or a member down (503), a
# member failing mid-request (502).
DOCUMENTED_5XX = {502, 503}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg(cmd: str) -> str:
    return subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), cmd], capture_output=True, text=True, check=True
    ).stdout.strip()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Proc:
    """A child process whose stderr is kept, ready once a line contains `ready_text`."""

    def __init__(self, name, args, env, log_path, ready_text="listening on"):
        self.name, self.args, self.env, self.ready_text = name, args, env, ready_text
        self.proc = None
        self.log = []
        self.log_file = open(log_path, "a")

    def start(self, timeout=300):
        self.log = []
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        ready = threading.Event()
        proc, log = self.proc, self.log

        def pump():
            for line in proc.stderr:
                self.log_file.write(line)
                log.append(line)
                del log[:-200]
                if self.ready_text in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.log[-40:]))

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
                return "killed after 60 s"
        return None


class Tally:
    """What the clients saw, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = Counter()  # (kind, status)
        self.ok_ids = set()  # answered 200
        self.other_ids = set()  # answered otherwise (ids from the x-request-id header)
        self.unexpected = []  # (kind, status, body) of 5xx outside DOCUMENTED_5XX, or a 200 where a refusal was due

    def add(self, kind, status, rid, body=""):
        with self.lock:
            self.statuses[(kind, status)] += 1
            if rid:
                (self.ok_ids if status == 200 else self.other_ids).add(rid)
            if status >= 500 and status not in DOCUMENTED_5XX:
                self.unexpected.append((kind, status, body[:300]))


def client_loop(base, key, limited_key, stop_at, tally, seed):
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as http:
        while time.time() < stop_at:
            kind = rng.choices(
                ["chat", "stream", "completion", "cancel", "bad", "limited"],
                weights=[4, 4, 2, 2, 1, 1],
            )[0]
            q = rng.choice(QUESTIONS)
            body = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": q}],
                    "max_tokens": rng.randint(4, 48)}
            auth = {"Authorization": f"Bearer {key}"}
            try:
                if kind == "chat":
                    r = http.post("/chat/completions", json=body, headers=auth)
                    tally.add(kind, r.status_code, r.headers.get("x-request-id"), r.text)
                elif kind == "completion":
                    r = http.post("/completions", headers=auth, json={
                        "model": MODEL, "prompt": q, "max_tokens": rng.randint(4, 32)})
                    tally.add(kind, r.status_code, r.headers.get("x-request-id"), r.text)
                elif kind in ("stream", "cancel"):
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    with http.stream("POST", "/chat/completions", json=body, headers=auth) as r:
                        rid = r.headers.get("x-request-id")
                        if r.status_code != 200:
                            r.read()
                            tally.add(kind, r.status_code, rid, r.text)
                            continue
                        lines = 0
                        for line in r.iter_lines():
                            lines += line.startswith("data:")
                            if kind == "cancel" and lines >= 2:
                                break  # closing the stream cancels the request
                        tally.add(kind, 200, rid)
                elif kind == "bad":
                    body["temperature"] = 7
                    r = http.post("/chat/completions", json=body, headers=auth)
                    tally.add(kind, r.status_code, r.headers.get("x-request-id"), r.text)
                    if r.status_code != 400:
                        with tally.lock:
                            tally.unexpected.append((kind, r.status_code, r.text[:300]))
                else:
                    r = http.post("/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {limited_key}"})
                    tally.add(kind, r.status_code, r.headers.get("x-request-id"), r.text)
            except httpx.HTTPError as e:
                # The connection failed (the gateway itself never restarts here): count it.
                tally.add(kind, 0, None, repr(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("TOLLGATE_BIN", str(ROOT / "target/release/tollgate")))
    ap.add_argument("--duration", type=float, default=1200, help="seconds of traffic (default 20 min)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds after which the RSS baseline is taken (default: a tenth of the run)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--logs", default="soak-logs", help="directory for the processes' logs")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else max(5.0, args.duration / 10)

    database = pg("reset")
    tmp = tempfile.mkdtemp(prefix="tollgate-soak-")
    worker_addr = f"127.0.0.1:{free_port()}"
    gw_port = free_port()
    config = os.path.join(tmp, "models.toml")
    with open(config, "w") as f:
        f.write(
            f'[models."{MODEL}"]\n'
            f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
            f'backend = {{ type = "http", urls = ["http://{worker_addr}"], api_key_env = "TOLLGATE_WORKER_TOKEN" }}\n'
            'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
        )
    env = dict(os.environ, TOLLGATE_WORKER_TOKEN=WORKER_TOKEN, TOLLGATE_ADMIN_TOKEN=ADMIN, RUST_LOG="info", NO_COLOR="1")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    worker = Proc("worker", [args.bin, "worker", "--model", MODEL, "--config", str(ROOT / "models.toml"),
                             "--listen", worker_addr], env, logs / "worker.log")
    gateway = Proc("gateway", [args.bin, "serve", "--config", config, "--listen", f"127.0.0.1:{gw_port}",
                               "--database", database, "--spool", os.path.join(tmp, "gw.spool")], env,
                   logs / "gateway.log")
    base = f"http://127.0.0.1:{gw_port}"
    figures = {}
    failures = []
    try:
        worker.start()
        gateway.start()
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert admin.post("/admin/v1/customers", json={"id": "soak"}).status_code == 201
        key = admin.post("/admin/v1/customers/soak/keys", json={"name": "soak"}).json()["key"]
        limited = admin.post("/admin/v1/customers/soak/keys", json={"name": "limited", "rpm": 1}).json()["key"]

        tally = Tally()
        # The refusals the soak checks for, sent once for certain (the random mix below may
        # draw the `bad` and `limited` kinds rarely in a short run on a slow machine): a bad
        # request, and two back to back on the key allowed one request a minute.
        probe = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = httpx.post(f"{base}/v1/chat/completions", json=dict(probe, temperature=7),
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        tally.add("bad", r.status_code, r.headers.get("x-request-id"), r.text)
        for _ in range(2):
            r = httpx.post(f"{base}/v1/chat/completions", json=probe,
                           headers={"Authorization": f"Bearer {limited}"}, timeout=120)
            tally.add("limited", r.status_code, r.headers.get("x-request-id"), r.text)
        start = time.time()
        stop_at = start + args.duration
        threads = [threading.Thread(target=client_loop, args=(f"{base}/v1", key, limited, stop_at, tally,
                                                               args.seed * 1000 + i), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        # The gateway's RSS over the run (a growth that steps at the faults and then stays
        # flat is retained memory; one that keeps climbing is a leak).
        timeline = []

        def sample():
            while time.time() < stop_at:
                try:
                    timeline.append((round(time.time() - start), round(rss_bytes(gateway.proc.pid) / 1e6, 1)))
                except (OSError, RuntimeError):
                    pass
                time.sleep(max(1.0, args.duration / 40))

        threading.Thread(target=sample, daemon=True).start()

        def at(fraction):
            time.sleep(max(0.0, start + args.duration * fraction - time.time()))

        at(min(warmup / args.duration, 0.3))
        figures["gateway_rss_warm_mb"] = rss_bytes(gateway.proc.pid) / 1e6
        at(1 / 3)
        print(f"[{time.time() - start:6.0f} s] killing the worker", flush=True)
        worker.kill()
        time.sleep(3)
        answered_at_restart = len(tally.ok_ids)
        worker.start()
        print(f"[{time.time() - start:6.0f} s] worker restarted", flush=True)
        # The worker's baseline: once it has served traffic since the restart (its caches
        # filled), not a time after it, which a slow model load would eat; at the latest a
        # little before PostgreSQL stops.
        warm_after = 2 * args.clients
        worker_warm_at = time.time() + warmup
        latest = start + args.duration * 0.6
        while time.time() < latest and (time.time() < worker_warm_at
                                        or len(tally.ok_ids) - answered_at_restart < warm_after):
            time.sleep(0.2)
        served = len(tally.ok_ids) - answered_at_restart
        figures["worker_rss_warm_after_requests"] = served
        if served < warm_after:
            print(f"[{time.time() - start:6.0f} s] worker baseline taken after only {served} requests "
                  f"since its restart", flush=True)
        figures["worker_rss_warm_mb"] = rss_bytes(worker.proc.pid) / 1e6
        at(2 / 3)
        print(f"[{time.time() - start:6.0f} s] stopping PostgreSQL", flush=True)
        pg("stop")
        time.sleep(5)
        pg("start")
        print(f"[{time.time() - start:6.0f} s] PostgreSQL started", flush=True)
        for t in threads:
            t.join(timeout=args.duration + 300)
        if any(t.is_alive() for t in threads):
            failures.append("a client thread hung")
        elapsed = time.time() - start
        # At the end of the traffic, before this script's own reads of the ledger (pages of
        # usage records are large answers) weigh on the gateway.
        figures["gateway_rss_end_mb"] = rss_bytes(gateway.proc.pid) / 1e6
        figures["worker_rss_end_mb"] = rss_bytes(worker.proc.pid) / 1e6

        # Idle: the engine lets go of every sequence and its KV cache.
        deadline = time.time() + 60
        while True:
            h = httpx.get(f"http://{worker_addr}/health", headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
                          timeout=10).json()
            m = next(m for m in h["models"] if m["id"] == MODEL)
            if (m["running"], m["waiting"], m["kv_cache_used_bytes"]) == (0, 0, 0) or time.time() > deadline:
                break
            time.sleep(0.5)
        figures["engine_at_end"] = {k: m[k] for k in ("running", "waiting", "kv_cache_used_bytes")}
        if (m["running"], m["waiting"], m["kv_cache_used_bytes"]) != (0, 0, 0):
            failures.append(f"the engine is not idle after the run: {figures['engine_at_end']}")

        # The ledger: wait until the gateway holds nothing unwritten, then compare.
        deadline = time.time() + 120
        while True:
            text = httpx.get(f"{base}/metrics", timeout=30).text
            pending = next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("tollgate_ledger_pending_records")), 0.0)
            if pending == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        records, cursor = [], None
        while True:
            params = {"limit": 1000, **({"after": cursor} if cursor else {})}
            r = admin.get("/admin/v1/usage/records", params=params)
            r.raise_for_status()
            page = r.json()
            records += [x for x in page["data"] if x["customer_id"] == "soak"]
            if not page["data"]:
                break
            cursor = page["next_cursor"]
        ids = [x["id"] for x in records]
        by_id = {x["id"]: x for x in records}
        doubled = len(ids) - len(set(ids))
        lost = tally.ok_ids - set(ids)
        strange = [i for i in set(ids) - tally.ok_ids
                   if i not in tally.other_ids or by_id[i]["status"] != "failed"]
        # A request answered with an error is recorded as failed (its prompt counted) and
        # never charged.
        billed_refusals = [i for i in set(ids) - tally.ok_ids if by_id[i]["cost_usd"].strip("0.")]
        if billed_refusals:
            failures.append(f"{len(billed_refusals)} requests answered with an error were charged")
        figures.update({
            "seconds": round(elapsed, 1),
            "requests": sum(tally.statuses.values()),
            "answered_200": len(tally.ok_ids),
            "records": len(records),
            "records_of_refused_requests_failed": len(set(ids) - tally.ok_ids) - len(strange),
            "records_of_refused_requests_billed": len(billed_refusals),
            "lost": len(lost),
            "doubled": doubled,
            "unaccounted_records": len(strange),
            "statuses": {f"{k} {s}": n for (k, s), n in sorted(tally.statuses.items())},
            "unexpected": tally.unexpected[:20],
            "gateway_rss_timeline_mb": timeline,
        })
        if lost:
            failures.append(f"{len(lost)} requests answered 200 have no usage record: {sorted(lost)[:5]}")
        if doubled:
            failures.append(f"{doubled} records doubled")
        if strange:
            failures.append(f"{len(strange)} records match no request answered 200 and are not failed ones")
        if tally.unexpected:
            failures.append(f"{len(tally.unexpected)} unexpected answers, e.g. {tally.unexpected[:3]}")
        for what in ("gateway", "worker"):
            warm, end = figures[f"{what}_rss_warm_mb"], figures[f"{what}_rss_end_mb"]
            figures[f"{what}_rss_growth"] = round(end / warm - 1, 4)
            if end > warm * 1.10:
                failures.append(f"{what} RSS grew {warm:.0f} -> {end:.0f} MB (more than 10%)")
        if tally.statuses.get(("limited", 429), 0) == 0:
            failures.append("the rate-limited key never got a 429")
        if tally.statuses.get(("bad", 400), 0) == 0:
            failures.append("no bad request was refused with 400")
    finally:
        codes = {"gateway": gateway.stop(), "worker": worker.stop()}
        pg("start")
        shutil.rmtree(tmp, ignore_errors=True)
    if codes["gateway"] not in (0, None):
        failures.append(f"the gateway's exit status after SIGTERM was {codes['gateway']}")
    figures["failures"] = failures
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if failures:
        print("soak FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        for proc in (gateway, worker):
            proc.log_file.flush()
            with open(proc.log_file.name) as f:
                worse = [line for line in f if " WARN " in line or " ERROR " in line]
            print(f"--- {proc.name}: {len(worse)} warnings and errors (log: {proc.log_file.name}) ---\n"
                  + "".join(worse[-30:]), file=sys.stderr)
        sys.exit(1)
    print("soak passed")


if __name__ == "__main__":
    main()
