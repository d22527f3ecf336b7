#!/usr/bin/env python3
"""Draft-free speculation and Predicted Outputs beside llama.cpp, in one run (issue 33, item 4).

Starts, one at a time, on the same GGUF file (the development model by default):

- `tollgate serve` with speculation off (`speculative_draft = 0` in its models.toml) and on
  (`speculative_draft = --tollgate-draft`, 8 by default, the engine's default), and
- llama.cpp's `llama-server` without speculation and with each of its draft-free
  `--spec-type` settings (`--spec-types`: ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod,
  ngram-cache), as many slots as Tollgate may run sequences at once (32, `-np 32 -kvu`),

and measures on each, server after server, these phases (bench/load.py's workloads and
request loop; greedy; every server gets the very same prompts, a phase's requests in a
round the same on every server; the dev model's system message first; the end tokens banned
with `logit_bias` and the same `max_tokens` for all, so every request of every server
decodes exactly as many tokens, checked):

- `code-edit c=1`: a ~300-line Python module to be returned whole with one function renamed
  (the output repeats the file), one stream. SmolLM2 describes such a file in a chat answer
  instead of repeating it, whatever it is told (a dozen prompts tried, on files of
  60 to 300 lines), and copies it once its
  answer has begun with the file's first line: so this phase sends the chat as one ChatML
  prompt to /v1/completions with the answer so begun (bench/load.py's `--prefill`);
- `code-edit chat c=1`: the same requests as chat completions (Tollgate off and on), and
- `code-edit+prediction c=1`: those with the file as OpenAI's `prediction` (Tollgate with
  speculation on only: llama.cpp's server has no equivalent, and `prediction` is for chat
  completions only);
- `prose c=1`: an essay, nothing in the prompt to copy;
- `code-edit c=16` (begun as in the first phase) and `prose c=16`: 16 clients.

Each server is started anew for each phase of each round (its caches empty, one warm-up
request before the measured ones) and stopped after it; the order of the servers rotates from
phase to phase and from round to round (bench/load.py's `turns`), so none always goes first.
The figure of a one-stream phase is the decode speed after the first token (median over the
requests, then over the rounds), of a 16-client phase the aggregate output tok/s (median
over the rounds). Printed: a table of every server and phase, then the issue's ratios,
Tollgate on against Tollgate off and against the best llama.cpp speculative setting of the
phase, with the goal beside each; no ratio where either side had errors. Also printed: how
many tokens a decode pass of Tollgate's yields (from its /metrics: completion tokens less
the first of each request, over the decode rows run), llama.cpp's accepted draft tokens of
those drafted (its `timings`), requests whose `finish_reason` or `completion_tokens` differ
from Tollgate off's, and outputs of Tollgate on that differ from Tollgate off's (speculation
must never change an output).

    flock /tmp/tollgate-bench.lock .venv/bin/python bench/spec.py --bin target/release/tollgate \\
        --json bench/results/spec-DATE.json [--rounds 2] [--requests-single 6] [--requests-multi 16]

`--json` writes the raw result (bench/load.py's records, one line per request, each with its
phase) with the command line, the commit, the CPU's flags, the machine's load before and
after each measurement, Tollgate's models.toml settings and llama-server's version and
command lines; `bench/spec.py --replot RESULT` prints the table again from the file alone.
"""

import argparse
import asyncio
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402
from compare import level_row, row_line  # noqa: E402
from interleave import Server, free_port, wait_healthy  # noqa: E402
from provenance import provenance  # noqa: E402
from servers import TOLLGATE_SLOTS, probe, slots_of  # noqa: E402
from workloads import SYSTEM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m"
API_KEY = "sk-bench-spec"
# SmolLM2's end tokens (`<|endoftext|>`, `<|im_end|>`): banned, every request runs to max_tokens.
END_TOKENS = "0,2"
SPEC_TYPES = "ngram-simple,ngram-map-k,ngram-map-k4v,ngram-mod,ngram-cache"
LLAMA_SERVER = os.path.expanduser("~/.cache/tollgate/llama-build/build/bin/llama-server")
DEFAULT_GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# (name, workload, clients, with the file as `prediction`, the answer begun with the file's first
# line on /v1/completions (bench/load.py's --prefill), on which servers: all, tollgate, on).
PHASES = (("code-edit c=1", "code-edit", 1, False, True, "all"),
          ("code-edit chat c=1", "code-edit", 1, False, False, "tollgate"),
          ("code-edit+prediction c=1", "code-edit", 1, True, False, "on"),
          ("prose c=1", "prose", 1, False, False, "all"), ("code-edit c=16", "code-edit", 16, False, True, "all"),
          ("prose c=16", "prose", 16, False, False, "all"))
# Phase: (the phase whose Tollgate-off and llama.cpp figures it is compared with, goal against
# Tollgate off, goal against the best llama.cpp speculative setting). The prediction phase asks
# what `code-edit chat c=1` asks, prompt for prompt.
GOALS = {"code-edit c=1": ("code-edit c=1", 2.0, 1.3), "code-edit chat c=1": ("code-edit chat c=1", None, None),
         "code-edit+prediction c=1": ("code-edit chat c=1", 3.0, None),
         "prose c=1": ("prose c=1", 0.97, None), "code-edit c=16": ("code-edit c=16", 0.97, None),
         "prose c=16": ("prose c=16", 0.97, None)}
OFF, ON = "tollgate-off", "tollgate-on"


def tollgate_config(workdir, draft, max_batch=None, gguf=DEFAULT_GGUF):
    """The repository's models.toml, its model's source the file `gguf` (the one llama.cpp's
    server loads) and its backend given `speculative_draft = draft` (and
    `speculative_max_batch`); returns the file's path."""
    with open(os.path.join(ROOT, "models.toml")) as f:
        text = f.read()
    text = re.sub(r'source = \{ path = "[^"]*" \}', lambda _: f"source = {{ path = {json.dumps(gguf)} }}", text, count=1)
    batch = f" speculative_max_batch = {max_batch}," if max_batch is not None else ""
    text = text.replace('backend = { type = "local",', f'backend = {{ type = "local", speculative_draft = {draft},{batch}')
    path = os.path.join(workdir, f"models-draft{draft}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def servers_of(args):
    """Every server of the run, in their first round's order: Tollgate off and on, then
    llama.cpp without speculation and with each `--spec-types` setting."""
    out = [{"label": OFF, "kind": "tollgate", "draft": 0}, {"label": ON, "kind": "tollgate", "draft": args.tollgate_draft}]
    out.append({"label": "llama.cpp", "kind": "llama", "spec_type": None})
    for t in (x.strip() for x in args.spec_types.split(",") if x.strip()):
        out.append({"label": f"llama.cpp {t}", "kind": "llama", "spec_type": t})
    for i, s in enumerate(out):
        s.update(index=i, model=MODEL, api_key=API_KEY if s["kind"] == "tollgate" else "")
    return out


def runs_on(phase, server):
    who = phase[5]
    return who == "all" or (who == "tollgate" and server["kind"] == "tollgate") or (who == "on" and server["label"] == ON)


def phases_of(args):
    wanted = [x.strip() for x in args.phases.split(",")] if args.phases else None
    return [p for p in PHASES if wanted is None or p[0] in wanted]


def llama_command(args, server, port):
    cmd = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-a", MODEL,
           "-t", str(args.threads), "-np", str(TOLLGATE_SLOTS), "-kvu", "-c", str(args.llama_ctx)]
    cmd += ["--spec-type", server["spec_type"]] if server["spec_type"] else []
    return cmd + shlex.split(args.llama_args)


def tollgate_command(args, server, port, workdir):
    config = tollgate_config(workdir, server["draft"], args.tollgate_max_batch, os.path.abspath(args.gguf))
    return [args.bin, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
            "--database", os.path.join(workdir, f"ledger-{port}.db")]


class Running:
    """One server process on a free port, started for one measurement and stopped after it."""

    def __init__(self, args, server, workdir):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if server["kind"] == "tollgate":
            cmd, env = tollgate_command(args, server, port, workdir), {"TOLLGATE_API_KEYS": API_KEY, "RUST_LOG": "warn"}
        else:
            cmd, env = llama_command(args, server, port), {}
        server["command"] = " ".join(cmd).replace(workdir, "$WORKDIR")
        self.log = open(os.path.join(workdir, f"{server['index']}-{port}.log"), "w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_healthy(self.proc, self.url, f"{server['label']}: see {self.log.name}", tries=1500)
            warm_up(self.url, server)
        except BaseException:
            self.stop()
            raise

    # Its process and log as interleave.py's Server keeps them: stopped the same way.
    stop = Server.stop


def warm_up(url, server):
    """One short request, not measured: the first request of a fresh process pays for what
    was not touched yet."""
    headers = {"Authorization": f"Bearer {server['api_key']}"} if server["api_key"] else {}
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]}
    httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600).raise_for_status()


def engine_counters(url):
    """Tollgate's engine counters from /metrics, or {} where there are none (llama.cpp)."""
    try:
        r = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return counters_of(r.text) if r.status_code == 200 else {}


def counters_of(text):
    """The engine counters of a Prometheus text, each summed over its series (models)."""
    names = ("tollgate_engine_steps_total", "tollgate_decode_tokens_total", "tollgate_prefill_tokens_total")
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return out


def level_args(args, phase):
    """bench/load.py's arguments for one phase."""
    _, workload, clients, prediction, prefill, _ = phase
    return argparse.Namespace(
        workload=workload, prediction=prediction, prefill=prefill, share_prompts="servers", prompt_tokens=0, system_tokens=0,
        system=True, file_lines=args.file_lines, run_id=args.run_id, temperature=0.0, ignore_eos=False,
        ban_tokens=END_TOKENS, max_tokens=args.code_tokens if workload == "code-edit" else args.prose_tokens,
        requests=args.requests_single if clients == 1 else args.requests_multi)


def measure(args, server, phase, rnd, position, workdir):
    """One phase on one server in one round: (run, records)."""
    name, clients = phase[0], phase[2]
    largs = level_args(args, phase)
    load_before = loadavg()
    try:
        running = Running(args, server, workdir)
    except (RuntimeError, httpx.HTTPError) as e:
        # Recorded as every request failing: no ratio for this server, and the run goes on.
        records = [{"server": server["index"], "round": rnd, "level": clients, "index": i, "phase": name,
                    "error": f"the server did not start: {e}", "finish_reason": None, "completion_tokens": None,
                    "prompt_tokens": None, "cached_tokens": None, "itl_ms": []} for i in range(largs.requests)]
        return {"phase": name, "server": server["index"], "round": rnd, "level": clients, "position": position,
                "wall_s": 0.0, "requests": largs.requests, "slots": [None, "not started"], "engine": {},
                "loadavg": [load_before, loadavg()]}, records
    try:
        told = TOLLGATE_SLOTS if server["kind"] == "tollgate" else None
        slots = slots_of(told, probe({**server, "base_url": f"{running.url}/v1"})["props"], "max_running")
        before = engine_counters(running.url)
        records, wall = asyncio.run(load.run_level({**server, "base_url": f"{running.url}/v1"}, largs, rnd, clients))
        after = engine_counters(running.url)
    finally:
        running.stop()
    for r in records:
        r["phase"] = name
    run = {"phase": name, "server": server["index"], "round": rnd, "level": clients, "position": position,
           "wall_s": wall, "requests": largs.requests, "max_tokens": largs.max_tokens, "slots": slots[:2],
           "engine": {k: after[k] - before.get(k, 0) for k in after}, "loadavg": [load_before, loadavg()]}
    return run, records


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def run(args):
    servers, phases = servers_of(args), phases_of(args)
    # Each server's command line is added to it when it is first started.
    doc = {**provenance(), "run_id": args.run_id, "rounds": args.rounds, "file_lines": args.file_lines,
           "system": SYSTEM, "ban_tokens": END_TOKENS, "servers": servers, "phases": [p[0] for p in phases],
           "tollgate": {"bin": args.bin, "version": version_of(args.bin), "speculative_draft_on": args.tollgate_draft,
                        "speculative_max_batch": args.tollgate_max_batch or "the engine's default (4)"},
           "llama_server_version": version_of(args.llama_server), "threads": args.threads,
           "note": args.note, "runs": [], "requests": []}
    print(f"slots: Tollgate {TOLLGATE_SLOTS} (its engine's max_running), llama.cpp {TOLLGATE_SLOTS} "
          f"(-np {TOLLGATE_SLOTS} -kvu -c {args.llama_ctx}); llama-server {doc['llama_server_version']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tollgate-spec-") as workdir:
        for rnd in range(1, args.rounds + 1):
            for p_i, phase in enumerate(phases):
                mine = [s for s in servers if runs_on(phase, s)]
                for position, server in enumerate(load.turns(mine, rnd, p_i)):
                    run_, records = measure(args, server, phase, rnd, position, workdir)
                    doc["runs"].append(run_)
                    doc["requests"] += records
                    save(args.json, doc)  # after every measurement: a run cut short keeps what it measured
                    row = level_row(records, run_["wall_s"], run_["level"])
                    print(f"round {rnd} {phase[0]}: {row_line(server['label'], row)} slots={run_['slots'][0]} "
                          f"load={run_['loadavg'][1].split()[0]}", flush=True)
                    for e in row["error_samples"]:
                        print(f"  error: {e}", file=sys.stderr, flush=True)
    for line in report(doc):
        print(line, flush=True)


def save(path, doc):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(load.result_text(doc))


def version_of(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"unknown ({e})"
    return "; ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip())[:300]


def figures(doc):
    """Per (phase, server label): the phase's figure (one stream: decode tok/s p50; more
    clients: aggregate tok/s; medians over the rounds), errors, requests, and how speculation
    went (Tollgate: tokens per decode row; llama.cpp: drafts kept of those made)."""
    labels = {s["index"]: s["label"] for s in doc["servers"]}
    out = {}
    for run_ in doc["runs"]:
        key = (run_["phase"], labels[run_["server"]])
        mine = [r for r in doc["requests"] if (r["phase"], r["server"], r["round"]) == (run_["phase"], run_["server"], run_["round"])]
        row = level_row(mine, run_["wall_s"], run_["level"])
        entry = out.setdefault(key, {"values": [], "errors": 0, "requests": 0, "rows": 0, "tokens": 0,
                                     "drafted": 0, "kept": 0, "predicted": [0, 0]})
        entry["values"].append(row["decode_tok_per_s_p50"] if run_["level"] == 1 else row["output_tok_per_s"])
        entry["errors"] += row["errors"]
        entry["requests"] += row["requests"]
        entry["rows"] += run_["engine"].get("tollgate_decode_tokens_total", 0)
        entry["tokens"] += sum((r["completion_tokens"] or 1) - 1 for r in mine if r["error"] is None)
        entry["drafted"] += sum(r.get("draft_n") or 0 for r in mine)
        entry["kept"] += sum(r.get("draft_n_accepted") or 0 for r in mine)
        for r in mine:
            details = r.get("completion_tokens_details") or {}
            entry["predicted"][0] += details.get("accepted_prediction_tokens") or 0
            entry["predicted"][1] += details.get("rejected_prediction_tokens") or 0
    for entry in out.values():
        values = [v for v in entry["values"] if v == v]
        entry["figure"] = statistics.median(values) if values else None
    return out


def speculation_note(entry):
    """How speculation went on a server in a phase, from what it reports."""
    notes = []
    if entry["rows"]:
        notes.append(f"{entry['tokens'] / entry['rows']:.2f} tokens/decode pass")
    if any(entry["predicted"]):
        notes.append("prediction tokens accepted {} rejected {}".format(*entry["predicted"]))
    if entry["drafted"]:
        notes.append(f"drafts kept {entry['kept']}/{entry['drafted']}")
    return ", ".join(notes)


def ratio_line(name, figs, labels):
    """The issue's ratios for one phase, or why there are none."""
    base, goal_off, goal_llama = GOALS[name]
    on, off = figs.get((name, ON)), figs.get((base, OFF))
    if not on or not off:
        return f"{name}: no ratio (Tollgate on or off not measured)"
    parts = []
    if on["errors"] or off["errors"]:
        parts.append(f"on/off: no ratio: errors {on['errors']} / {off['errors']}")
    elif on["figure"] and off["figure"]:
        goal = f" (goal >= {goal_off}x)" if goal_off else ""
        parts.append(f"on/off {on['figure'] / off['figure']:.2f}x{goal}")
    spec = [(figs[(base, label)], label) for label in labels
            if label.startswith("llama.cpp ") and (base, label) in figs]
    if spec:
        best, best_label = max(spec, key=lambda e: e[0]["figure"] or 0)
        if on["errors"] or any(e["errors"] for e, _ in spec):
            parts.append("on/best llama.cpp speculative: no ratio: errors on a side")
        elif on["figure"] and best["figure"]:
            goal = f" (goal >= {goal_llama}x)" if goal_llama else ""
            parts.append(f"on/best llama.cpp speculative ({best_label}) {on['figure'] / best['figure']:.2f}x{goal}")
    return f"{name}: " + "; ".join(parts)


def differences(doc):
    """(requests whose finish_reason or completion_tokens differ from Tollgate off's, outputs
    of Tollgate on that differ from Tollgate off's), as lines to print."""
    off = next(s["index"] for s in doc["servers"] if s["label"] == OFF)
    on = next(s["index"] for s in doc["servers"] if s["label"] == ON)
    # The prediction phase asks what `code-edit c=1` asks, prompt for prompt.
    def key(r):
        return (GOALS.get(r["phase"], (r["phase"],))[0], r["round"], r["index"])

    lines = []
    reference = {key(r): r for r in doc["requests"] if r["server"] == off and r["error"] is None}
    for s in doc["servers"]:
        if s["index"] == off:
            continue
        pairs = [(reference[key(r)], r) for r in doc["requests"]
                 if r["server"] == s["index"] and r["error"] is None and key(r) in reference]
        found = [b for a, b in pairs
                 if (a["finish_reason"], a["completion_tokens"]) != (b["finish_reason"], b["completion_tokens"])]
        if found:
            lines.append(f"  {s['label']}: {len(found)} of {len(pairs)} requests differ from {OFF} in "
                         "finish_reason or completion_tokens: not the same work")
        if s["index"] == on:
            changed = sum(a.get("output_sha1") != b.get("output_sha1") for a, b in pairs)
            lines.append(f"  {ON}: {changed} of {len(pairs)} outputs differ from {OFF}'s "
                         f"({'speculation changed an output' if changed else 'all byte-identical'})")
    return lines


def report(doc):
    """The table and the ratios, from a result alone."""
    labels = [s["label"] for s in doc["servers"]]
    figs = figures(doc)
    lines = ["", "figure per phase: one stream decode tok/s (p50), 16 clients aggregate tok/s; medians over rounds"]
    for name in doc["phases"]:
        cells = []
        for label in labels:
            e = figs.get((name, label))
            if e:
                err = f" ERRORS {e['errors']}" if e["errors"] else ""
                value = f"{e['figure']:.1f}" if e["figure"] else "n/a"
                cells.append(f"{label} {value}{err} ({speculation_note(e)})" if speculation_note(e) else f"{label} {value}{err}")
        lines.append(f"{name}: " + " | ".join(cells))
    lines.append("")
    lines += [ratio_line(name, figs, labels) for name in doc["phases"] if name in GOALS]
    lines += ["", "same work (end tokens banned, same max_tokens; Tollgate off the reference):"]
    lines += differences(doc) or ["  every server decoded as many tokens as Tollgate off on every request"]
    return lines


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.environ.get("TOLLGATE_BIN", os.path.join(ROOT, "target", "release", "tollgate")))
    p.add_argument("--llama-server", default=LLAMA_SERVER)
    p.add_argument("--gguf", default=os.environ.get("TOLLGATE_TEST_MODEL", DEFAULT_GGUF),
                   help="the model file both servers load (Tollgate's models.toml names the same)")
    p.add_argument("--spec-types", default=SPEC_TYPES, help="llama-server's --spec-type settings to run")
    p.add_argument("--tollgate-draft", type=int, default=8, help="speculative_draft of Tollgate on")
    p.add_argument("--tollgate-max-batch", type=int, help="speculative_max_batch (default: the engine's)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t")
    p.add_argument("--llama-ctx", type=int, default=65536, help="llama-server -c (shared by its 32 slots, -kvu)")
    p.add_argument("--llama-args", default="",
                   help="more llama-server flags for every llama.cpp server (e.g. '--poll 0' on a busy machine)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests-single", type=int, default=6, help="requests of a one-stream phase")
    p.add_argument("--requests-multi", type=int, default=16, help="requests of a 16-client phase")
    p.add_argument("--code-tokens", type=int, default=1024, help="max_tokens of a code-edit request")
    p.add_argument("--prose-tokens", type=int, default=512, help="max_tokens of a prose request")
    p.add_argument("--file-lines", type=int, default=300)
    p.add_argument("--phases", help="comma-separated phase names (default: all)")
    p.add_argument("--run-id", default=os.urandom(2).hex())
    p.add_argument("--note", default="", help="kept in the result (what else ran on the machine)")
    p.add_argument("--json")
    p.add_argument("--replot", metavar="RESULT_JSON", help="print the table of a result file, without a server")
    return p


def main():
    args = parser().parse_args()
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        for line in report(doc):
            print(line)
        return
    start = time.time()
    run(args)
    print(f"took {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
