#!/usr/bin/env python3
"""The share of the gateway's CPU each stage of a request takes, from a CPU profile.

Reads folded stacks (one line per stack, frames root first, separated by `;`, then a space and
a count: what `inferno-collapse-perf --kernel` makes of `perf script`), and gives each sample to one
stage: the stage of the deepest frame that names one (so the allocations, copies and system
calls a stage makes are its own, and a stage nested in another, such as the ledger write inside
the handler, is counted apart from it). Samples with no such frame go by the thread or the
connection they ran on. Writes the table (and with --json the shares as JSON).

    perf record -p PID -F 499 --call-graph dwarf,16384 -o prof.data -- sleep 10
    perf script -i prof.data | inferno-collapse-perf --kernel > prof.folded
    python3 bench/profile_stages.py prof.folded --requests N --cpu-us-per-request X --json out.json
"""

import argparse
import json
import re
import sys
from collections import Counter

# (stage, patterns): the first stage whose pattern a frame matches is that frame's stage.
STAGES = [
    ("logging", [r"tracing_core::event::Event::dispatch", r"tracing_subscriber::fmt",
                 r"tracing::__macro_support", r"Stderr"]),
    ("tracing (spans)", [r"tracing_core::span", r"tracing::span::", r"Instrumented<",
                         r"server::telemetry", r"tracing_opentelemetry", r"opentelemetry"]),
    ("metrics", [r"prometheus::", r"Completion::observe", r"middleware::observe"]),
    ("spool fdatasync (syncer thread)", [r"spool::Syncer"]),
    ("spool write", [r"Ledger::append_now", r"ledger::spool::", r"Ledger::record",
                     r"ledger::spool_loop"]),
    ("database writer", [r"db_writer", r"sqlx", r"sqlite3", r"libsqlite", r"flume::"]),
    ("auth and key cache", [r"tollgate_gateway::auth::", r"secrets::digest", r"sha2::"]),
    ("limits and reservations", [r"tollgate_metering::limits", r"gateway::concurrency",
                                 r"admission::admit", r"admission::enter",
                                 r"ReservationMeter", r"Completion::settle",
                                 r"Completion::abandon"]),
    ("JSON parse and validation", [r"error::parse_json", r"ApiJson", r"api::openai::plan",
                                   r"serde_path_to_error", r"tags::Tags"]),
    ("upstream client", [r"backend::upstream", r"reqwest::", r"hyper::client",
                         r"hyper_util::client", r"dispatch::Client", r"eventsource",
                         r"url::", r"role::Client"]),
    ("response shaping", [r"completions::collect", r"completions::fold", r"completions::shapes",
                          r"axum::json", r"Json<", r"api::openai::answers", r"accounting::"]),
    ("HTTP server (parse, route, write)", [r"hyper::server", r"hyper_util::server",
                                           r"dispatch::Server", r"role::Server", r"axum::",
                                           r"listener::serve", r"oversize::", r"request_id",
                                           r"shed::", r"idempotency::layer"]),
]
# HTTP/1 code both sides share: the client's when the stack is an upstream connection's.
HTTP_SHARED = re.compile(r"hyper::proto|hyper::body|httparse|http::header|tower::")
CLIENT = re.compile(r"dispatch::Client|reqwest::|hyper::client|hyper_util::client")
# Only when no frame of the stack names a stage: by the code or the thread it ran on.
FALLBACK = [
    ("handler (other gateway code)", re.compile(r"tollgate_gateway::|tollgate_metering::")),
    ("spool fdatasync (syncer thread)", re.compile(r"^ledger-sync")),
    ("spool write", re.compile(r"^ledger-spool")),
    ("database writer", re.compile(r"^sqlx")),
    ("async runtime (scheduling, wake-ups)", re.compile(r"tokio::|mio::|^tokio-rt-worker")),
]
COMPILED = [(name, re.compile("|".join(p))) for name, p in STAGES]
ORDER = ([name for name, _ in STAGES] + ["handler (other gateway code)",
         "async runtime (scheduling, wake-ups)", "other"])
def stage_of(frames):
    """The innermost user frame that names a stage decides; kernel frames (`_[k]`, from
    `inferno-collapse-perf --kernel`) are the system calls of the user frame above them and
    go to its stage."""
    client = None
    for frame in reversed(frames):
        if frame.endswith("_[k]"):
            continue
        for name, rx in COMPILED:
            if rx.search(frame):
                return name
        if HTTP_SHARED.search(frame):
            if client is None:
                client = any(CLIENT.search(f) for f in frames)
            return "upstream client" if client else "HTTP server (parse, route, write)"
    for name, rx in FALLBACK:
        if any(rx.search(f) for f in frames):
            return name
    return "other"


KERNEL = re.compile(r"_\[k\]$")


def in_kernel(frames):
    return any(KERNEL.search(f) for f in frames[1:])


def shares(path):
    total = 0
    by_stage = Counter()
    kernel = Counter()
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            s = stage_of(frames)
            total += n
            by_stage[s] += n
            if in_kernel(frames):
                kernel[s] += n
    return total, by_stage, kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folded")
    ap.add_argument("--cpu-us-per-request", type=float,
                    help="the gateway's CPU per request in the same run, to turn shares into µs")
    ap.add_argument("--label", default="", help="what was profiled (written into the JSON)")
    ap.add_argument("--json")
    a = ap.parse_args()
    total, by_stage, kernel = shares(a.folded)
    if total == 0:
        sys.exit("no samples")
    rows = []
    print(f"{'stage':40} {'share':>7} {'of it in kernel':>16} {'µs/request':>11}")
    for name in ORDER:
        n = by_stage.get(name, 0)
        if n == 0:
            continue
        share = n / total
        us = share * a.cpu_us_per_request if a.cpu_us_per_request else None
        rows.append({"stage": name, "share": round(share, 4),
                     "kernel_share_of_stage": round(kernel[name] / n, 3),
                     "us_per_request": None if us is None else round(us, 1)})
        print(f"{name:40} {share:7.1%} {kernel[name] / n:16.0%} "
              f"{'' if us is None else f'{us:11.1f}'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"label": a.label, "folded": a.folded, "samples_weight": total,
                       "cpu_us_per_request": a.cpu_us_per_request, "stages": rows},
                      f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
