"""CPU time of one forward pass by the rows it feeds, for two or more builds of
`runtime/examples/verify_cost.rs` side by side: its mean CPU time per pass (every thread's,
measured around the passes only, so loading and the prompt are left out), run with
RAYON_NUM_THREADS=1: the single-threaded cost, which other work on the machine disturbs far
less than wall time (it still inflates it: caches are shared).

    python3 bench/verify_cost.py --bin base=PATH --bin new=PATH [--rows 1 4 9] \\
        [--contexts 700 4000] [--passes 30] [--repeat 2] [--json bench/results/...json]

Each (context, rows) pair runs every build in turn, the order alternating with each repeat.
Every run holds /tmp/tollgate-bench.lock (flock) and the load average is recorded beside it.
Standard library only."""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402


def load():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def cpu_ms(binary, context, rows, passes):
    """CPU milliseconds per pass, with all logits and with the last only, of one
    single-threaded run."""
    cmd = ["flock", "/tmp/tollgate-bench.lock", binary, "--context", str(context),
           "--rows", str(rows), "--passes", str(passes)]
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    fields = out.stdout.strip().splitlines()[-1].split()
    # rows, all (ms), vs 1, last (ms), vs 1, per row (ms), cpu all (ms), cpu last (ms)
    return float(fields[-4]), float(fields[-2])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", action="append", required=True, help="NAME=PATH, two or more")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 9])
    p.add_argument("--contexts", type=int, nargs="+", default=[700])
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    bins = [b.split("=", 1) for b in args.bin]
    result = {"provenance": provenance(), "bins": dict(bins), "passes": args.passes,
              "load_average_before": load(), "runs": []}
    print(f"ms of CPU per pass (1 thread, mean of {args.passes}), all logits / last only,"
          f" load {load()}")
    for context in args.contexts:
        for rows in args.rows:
            for rep in range(args.repeat):
                order = bins if rep % 2 == 0 else bins[::-1]
                for name, binary in order:
                    before = load()
                    all_ms, last_ms = cpu_ms(binary, context, rows, args.passes)
                    result["runs"].append({"bin": name, "context": context, "rows": rows,
                                           "cpu_ms_all_logits": all_ms,
                                           "cpu_ms_last_logits": last_ms,
                                           "load_before": before, "load_after": load()})
                    print(f"context {context:5} rows {rows:2} {name:>6}: {all_ms:7.2f} ms"
                          f" / {last_ms:7.2f} ms  (load {before.split()[0]})", flush=True)
    result["load_average_after"] = load()
    summary = {}
    for r in result["runs"]:
        summary.setdefault((r["context"], r["rows"], r["bin"]), []).append(r["cpu_ms_all_logits"])
    print("median CPU ms per pass, all logits:")
    for (context, rows, name), v in sorted(summary.items()):
        v = sorted(v)
        print(f"context {context:5} rows {rows:2} {name:>6}: {v[len(v) // 2]:7.2f} ms  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
