#!/usr/bin/env python3
"""Newcomers started between the layers of a step, on and off (issue 29, item 4).

Starts `tollgate serve` twice on the repository's models.toml, once with newcomers started
between layers (`backend.interleave_passes`, `--on-passes`, 4 by default) and once without (0: they join
the next step), each with a throwaway database and customers made through the admin API. On
each: 16 customers, each with its own 300-token system prompt, send one request at a time
(16 tokens) while customer A holds 8 streams of 128 tokens (end tokens banned), for
`--duration` seconds (bench/load.py's many-customer workload), after `--warmup` seconds of the
16 customers alone (their system prompts cached, as in a server that has been running). Reported: A's inter-token p99,
the total tok/s, the 16 customers' TTFT p50, each on against off. With `--two-tenants`, the
two-tenant workload runs on the interleaving server as well (A 32 streams, B `--b-tokens`
(16) tokens one at a time; B alone, A alone, both), B's requests counted.

Raw results, the command, the commit and the CPU's flags go to `--json`:

    .venv/bin/python bench/interleave.py --bin target/release/tollgate \\
        --json bench/results/interleave.json [--duration 30] [--two-tenants]
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = "bench-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_with_passes(passes, workdir, every=None):
    """The repository's models.toml with `backend.interleave_passes = passes` (and
    `interleave_every = every` when given; a negative `passes`: the file as it is, for a binary
    that predates the setting)."""
    path = os.path.join(ROOT, "models.toml")
    if passes < 0:
        return path
    with open(path) as f:
        text = f.read()
    text = text.replace('source = { path = "models/', f'source = {{ path = "{ROOT}/models/')
    every_field = f" interleave_every = {every}," if every is not None else ""
    text = text.replace('backend = { type = "local",',
                        f'backend = {{ type = "local", interleave_passes = {passes},{every_field}')
    out = os.path.join(workdir, f"models-{passes}-{every}.toml")
    with open(out, "w") as f:
        f.write(text)
    return out


def wait_healthy(proc, url, hint="", tries=600, pause=0.2):
    """Returns once the server `proc` at `url` answers /health; raises if it exits or never does."""
    for _ in range(tries):
        if proc.poll() is not None:
            raise RuntimeError(f"tollgate exited with {proc.returncode}; {hint}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(pause)
    raise RuntimeError(f"tollgate did not answer /health; {hint}")


class Server:
    """`tollgate serve` on a free port with a throwaway database."""

    def __init__(self, binary, passes, workdir, every=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TOLLGATE_ADMIN_TOKEN": ADMIN, "RUST_LOG": "warn"}
        self.log = open(os.path.join(workdir, f"serve-{passes}-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config_with_passes(passes, workdir, every),
             "--listen", f"127.0.0.1:{self.port}", "--database", os.path.join(workdir, f"db-{passes}-{self.port}.sqlite")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_healthy(self.proc, self.url, f"see {self.log.name}")

    def key(self, customer):
        h = {"Authorization": f"Bearer {ADMIN}"}
        r = httpx.post(f"{self.url}/admin/v1/customers", headers=h, json={"id": customer, "name": customer})
        r.raise_for_status()
        r = httpx.post(f"{self.url}/admin/v1/customers/{customer}/keys", headers=h, json={"name": "bench"})
        r.raise_for_status()
        return r.json()["key"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load_args(server, **over):
    """bench/load.py's arguments, as its command line would give them."""
    base = dict(base_url=f"{server.url}/v1", model="smollm2-135m", api_key="", temperature=0.0,
                ignore_eos=False, ban_tokens="", max_tokens=16, system_tokens=300, prompt_tokens=0,
                unique_prompts=False, label="", json=None, duration=30.0, a_streams=8, a_tokens=128,
                b_tokens=16, api_key_a=None, api_key_b=None)
    base.update(over)
    return argparse.Namespace(**base)


def many_customers(server, duration, warmup):
    keys = [server.key(f"c{n:02}") for n in range(16)]
    a_key = server.key("a")
    if warmup > 0:
        # The 16 customers alone first: their system prompts reach the prefix cache before A's
        # streams and the measured period start, so both servers are measured warm.
        asyncio.run(load.customers(load_args(server, duration=warmup, ban_tokens="0,2", max_tokens=16,
                                             system_tokens=300), keys))
    args = load_args(server, duration=duration, api_key_a=a_key, a_streams=8, a_tokens=128,
                     ban_tokens="0,2", max_tokens=16, system_tokens=300)
    # The end tokens are banned for everyone: every request runs to its length, so both
    # servers do the same work.
    return asyncio.run(load.customers(args, keys))


def two_tenants(server, duration, b_tokens):
    args = load_args(server, duration=duration, api_key_a=server.key("ta"), api_key_b=server.key("tb"),
                     a_streams=32, max_tokens=128, b_tokens=b_tokens, system_tokens=0)
    b_alone = asyncio.run(load.two_tenants(args, with_a=False, with_b=True))
    a_alone = asyncio.run(load.two_tenants(args, with_a=True, with_b=False))
    both = asyncio.run(load.two_tenants(args, with_a=True, with_b=True))
    return {"b_alone": b_alone, "a_alone": a_alone, "both": both,
            "b_ttft_p99_over_alone": both["b_ttft_p99_ms"] / b_alone["b_ttft_p99_ms"],
            "a_tok_per_s_of_alone": both["a_tok_per_s"] / a_alone["a_tok_per_s"]}


def report(label, run):
    m = run["many_customers"]
    print(f"round {run['round']} interleaving {label}: A itl p50/p99 {m['a_itl_p50_ms']:.1f}/{m['a_itl_p99_ms']:.1f} ms, "
          f"total {m['total_tok_per_s']:.1f} tok/s, customers' TTFT p50 {m['ttft_p50_ms']:.0f} ms "
          f"({m['requests']} requests), errors {m['errors']}", flush=True)
    if "two_tenants" in run:
        t = run["two_tenants"]
        print(f"  two tenants: B TTFT p99 {t['both']['b_ttft_p99_ms']:.0f} ms vs alone "
              f"{t['b_alone']['b_ttft_p99_ms']:.0f} ({t['b_ttft_p99_over_alone']:.2f}x, "
              f"{t['both']['b_requests']} requests); A {t['a_tok_per_s_of_alone']:.2f} of alone", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "tollgate"))
    p.add_argument("--json", required=True)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of the many-customer phase")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds the 16 customers send alone before A starts and the measured period "
                        "(0: measured from a cold start, every system prompt prefilled at once)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the servers this many times, alternating (medians compared)")
    p.add_argument("--two-tenants", action="store_true")
    p.add_argument("--two-tenants-duration", type=float, default=35.0)
    p.add_argument("--b-tokens", type=int, default=16,
                   help="tokens of each of B's requests (bench/load.py's two-tenant default)")
    p.add_argument("--on-passes", type=int, default=4,
                   help="interleave_passes of the `on` server (the engine's default is 4; "
                        "negative: models.toml as it is, for a binary that predates the setting)")
    p.add_argument("--on-every", type=int, default=None,
                   help="interleave_every of the `on` server (default: the engine's, 8)")
    p.add_argument("--modes", default="on,off",
                   help="which servers to run: on (4 interleaved passes a step), off (0); a binary "
                        "from before the setting existed runs as `on` whatever it is told")
    p.add_argument("--note", default="", help="kept in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args()
    out = {**provenance(), "note": args.note, "runs": {}}
    modes = [m.strip() for m in args.modes.split(",")]
    with tempfile.TemporaryDirectory() as work:
        for rnd in range(args.rounds):
            for label, passes in (("on", args.on_passes), ("off", 0)):
                if label not in modes:
                    continue
                server = Server(args.bin, passes, work, args.on_every if passes else None)
                try:
                    run = {"round": rnd + 1, "interleave_passes": passes,
                           "interleave_every": args.on_every if passes else None,
                           "warmup_s": args.warmup,
                           "many_customers": many_customers(server, args.duration, args.warmup)}
                    if args.two_tenants and passes and rnd == 0:
                        run["two_tenants"] = two_tenants(server, args.two_tenants_duration, args.b_tokens)
                finally:
                    server.stop()
                out["runs"].setdefault(label, []).append(run)
                report(label, run)
    medians = {label: {k: statistics.median(r["many_customers"][k] for r in runs)
                       for k in ("a_itl_p99_ms", "total_tok_per_s", "ttft_p50_ms")}
               for label, runs in out["runs"].items()}
    out["medians"] = medians
    print(json.dumps(medians), flush=True)
    if len(medians) == 2:
        on, off = medians["on"], medians["off"]
        out["ratios"] = {"a_itl_p99_on_over_off": on["a_itl_p99_ms"] / off["a_itl_p99_ms"],
                         "total_tok_per_s_on_over_off": on["total_tok_per_s"] / off["total_tok_per_s"],
                         "ttft_p50_on_over_off": on["ttft_p50_ms"] / off["ttft_p50_ms"]}
        print(json.dumps(out["ratios"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
