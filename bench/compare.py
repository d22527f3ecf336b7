"""What bench/load.py makes of its raw figures: one row of figures per server, round and
concurrency level, their medians over the rounds, the requests whose output differs in length
between the two servers, the ratios (refused where either side had errors), and the SVG chart.

Everything here is computed from a result file's `runs` and `requests` alone, so
`bench/load.py --replot result.json --svg out.svg` redraws a chart (and prints the table) from a
committed result without a server. Pure functions; standard library only."""

import math
import statistics

# Below this many requests at a level, a p99 is the maximum of a handful: reported as n/a.
MIN_P99_REQUESTS = 100

MEDIAN_KEYS = ("output_tok_per_s", "decode_tok_per_s_p50", "ttft_p50_ms", "itl_p50_ms", "latency_p50_s")


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def p99(values, requests):
    """The p99 of `values`, or None when they come from fewer than MIN_P99_REQUESTS requests."""
    return pct(values, 0.99) if requests >= MIN_P99_REQUESTS else None


def level_row(records, wall_s, level):
    """The figures of one server's requests at one level (one round, or several pooled)."""
    ok = [r for r in records if r["error"] is None]
    n = len(ok)
    itl = [x for r in ok for x in r["itl_ms"]]
    cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {
        "concurrency": level,
        "requests": n,
        "errors": len(records) - n,
        "error_samples": sorted({r["error"] for r in records if r["error"] is not None})[:3],
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tok_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "decode_tok_per_s_p50": pct([r["decode_tok_per_s"] for r in ok if r["decode_tok_per_s"]], 0.5),
        "ttft_p50_ms": pct([r["ttft_s"] * 1e3 for r in ok], 0.5),
        "ttft_p99_ms": p99([r["ttft_s"] * 1e3 for r in ok], n),
        "itl_p50_ms": pct(itl, 0.5),
        "itl_p99_ms": p99(itl, n),
        "latency_p50_s": pct([r["latency_s"] for r in ok], 0.5),
        "latency_p99_s": p99([r["latency_s"] for r in ok], n),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok),
        # None: the server reported no usage.prompt_tokens_details.cached_tokens.
        "cached_tokens": sum(cached) if cached else None,
    }


def mismatches(records):
    """Requests (by round, level and index) that both servers answered with a different
    finish_reason or number of completion tokens."""
    by_key = {}
    for r in records:
        if r["error"] is None:
            by_key.setdefault((r["round"], r["level"], r["index"]), {})[r["server"]] = r
    out = []
    for (rnd, level, index), pair in sorted(by_key.items()):
        if len(pair) < 2:
            continue
        a, b = pair[0], pair[1]
        if (a["finish_reason"], a["completion_tokens"]) != (b["finish_reason"], b["completion_tokens"]):
            out.append({"round": rnd, "level": level, "index": index,
                        "finish_reason": [a["finish_reason"], b["finish_reason"]],
                        "completion_tokens": [a["completion_tokens"], b["completion_tokens"]]})
    return out


def ratio(a, b, errors_a, errors_b):
    """a / b, or None where either side had errors (or a figure is missing)."""
    if errors_a or errors_b or a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def summarize(doc):
    """From a result's `servers`, `runs` and `requests`: per server, the rows of each round and
    level and their medians; the output mismatches and the ratios of the first server to the
    second per level."""
    labels = [s["label"] for s in doc["servers"]]
    requests = doc["requests"]
    rounds = {label: {} for label in labels}
    for run in doc["runs"]:
        mine = [r for r in requests if (r["server"], r["round"], r["level"]) == (run["server"], run["round"], run["level"])]
        row = level_row(mine, run["wall_s"], run["level"])
        row.update(round=run["round"], first=run["first"], peak_rss_mb=run.get("peak_rss_mb"))
        rounds[labels[run["server"]]].setdefault(run["level"], []).append(row)
    medians = {}
    for s, label in enumerate(labels):
        medians[label] = []
        for level, rows in rounds[label].items():
            pooled = level_row([r for r in requests if (r["server"], r["level"]) == (s, level)],
                               sum(row["wall_s"] for row in rows), level)
            for k in MEDIAN_KEYS:
                values = [row[k] for row in rows if row[k] == row[k]]  # drop NaN
                pooled[k] = statistics.median(values) if values else float("nan")
            pooled["rounds"] = len(rows)
            medians[label].append(pooled)
    out = {"rounds": rounds, "medians": medians, "share_prompts": doc.get("share_prompts", "none")}
    if len(labels) == 2:
        out["mismatches"] = mismatches(requests)
        out["ratios"] = []
        for a, b in zip(medians[labels[0]], medians[labels[1]]):
            figures = {k: ratio(a[k], b[k], a["errors"], b["errors"])
                       for k in ("output_tok_per_s", "decode_tok_per_s_p50", "ttft_p50_ms")}
            out["ratios"].append({"concurrency": a["concurrency"], **figures,
                                  "mismatches": sum(m["level"] == a["concurrency"] for m in out["mismatches"])})
    return out


def fmt(value, unit="", digits=0, requests=None):
    """A figure for the table: `n/a (N requests)` for a p99 left out, `n/a` for a missing one."""
    if value is None:
        return f"n/a ({requests} requests)" if requests is not None else "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def row_line(label, row):
    n = row["requests"]
    cached = "n/a" if row["cached_tokens"] is None else f"{row['cached_tokens']}/{row['prompt_tokens']}"
    rss = f" rss_peak={row['peak_rss_mb']:.0f}MB" if row.get("peak_rss_mb") else ""
    return (f"{label} c={row['concurrency']:<3} requests={n} errors={row['errors']} "
            f"tok/s={fmt(row['output_tok_per_s'], digits=1)} decode p50={fmt(row['decode_tok_per_s_p50'], digits=1)} tok/s "
            f"ttft p50/p99={fmt(row['ttft_p50_ms'])}/{fmt(row['ttft_p99_ms'], requests=n)} ms "
            f"itl p50/p99={fmt(row['itl_p50_ms'], digits=1)}/{fmt(row['itl_p99_ms'], digits=1, requests=n)} ms "
            f"latency p50/p99={fmt(row['latency_p50_s'], digits=2)}/{fmt(row['latency_p99_s'], digits=2, requests=n)} s "
            f"cached prompt tokens={cached}{rss}")


def report(summary, labels):
    """The lines bench/load.py prints at the end of a run (and --replot prints again)."""
    lines = []
    for label in labels:
        for row in summary["medians"][label]:
            lines.append(f"{row_line(label, row)} (medians over {row['rounds']} round(s); p99s over their requests)")
    if len(labels) < 2:
        return lines
    for r, a, b in zip(summary["ratios"], *(summary["medians"][label] for label in labels)):
        level = r["concurrency"]
        if r["output_tok_per_s"] is None:
            lines.append(f"c={level:<3} {labels[0]} / {labels[1]}: no ratio: errors {a['errors']} / {b['errors']}")
            continue
        lines.append(f"c={level:<3} {labels[0]} / {labels[1]}: tok/s {fmt(a['output_tok_per_s'], digits=1)} / "
                     f"{fmt(b['output_tok_per_s'], digits=1)} ({fmt(r['output_tok_per_s'], 'x', 2)}), "
                     f"decode {fmt(r['decode_tok_per_s_p50'], 'x', 2)}, TTFT p50 {fmt(r['ttft_p50_ms'], 'x', 2)}")
        if r["mismatches"]:
            lines.append(f"c={level:<3} output lengths differ in {r['mismatches']} of the paired requests: "
                         "the two servers did not do the same work")
    if summary["mismatches"] and summary.get("share_prompts") != "servers":
        lines.append("  (each server's prompts carry its own tag, so where the model ends its answer itself "
                     "the outputs may differ: --share-prompts servers sends both the same prompts, "
                     "--ban-tokens runs both to max_tokens)")
    for m in summary["mismatches"][:5]:
        lines.append(f"  mismatch round {m['round']} c={m['level']} request {m['index']}: finish_reason "
                     f"{m['finish_reason'][0]} / {m['finish_reason'][1]}, completion_tokens "
                     f"{m['completion_tokens'][0]} / {m['completion_tokens'][1]}")
    return lines


def svg_plot(series, title):
    """A minimal SVG bar chart of aggregate tok/s per concurrency level, one bar per server."""
    w, h, pad = 560, 320, 50
    levels = sorted({r["concurrency"] for rows in series.values() for r in rows})
    top = max((r["output_tok_per_s"] for rows in series.values() for r in rows), default=1) or 1
    colors = ["#4a7bd0", "#d0874a", "#5aa05a"]
    slot = (w - 2 * pad) / max(len(levels), 1)
    bar_w = slot * 0.7 / max(len(series), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="{w/2}" y="20" text-anchor="middle">{title}: output tokens/s by concurrency</text>']
    for s_i, (label, rows) in enumerate(series.items()):
        color = colors[s_i % len(colors)]
        parts.append(f'<rect x="{pad + s_i * 120}" y="{h - 18}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{pad + s_i * 120 + 14}" y="{h - 9}">{label}</text>')
        for r in rows:
            i = levels.index(r["concurrency"])
            x = pad + i * slot + s_i * bar_w
            bh = (h - 2 * pad) * r["output_tok_per_s"] / top
            parts.append(f'<rect x="{x:.0f}" y="{h - pad - bh:.0f}" width="{bar_w:.0f}" height="{bh:.0f}" fill="{color}"/>')
            parts.append(f'<text x="{x + bar_w/2:.0f}" y="{h - pad - bh - 4:.0f}" text-anchor="middle">{r["output_tok_per_s"]:.0f}</text>')
    for i, level in enumerate(levels):
        parts.append(f'<text x="{pad + i * slot + slot * 0.35:.0f}" y="{h - pad + 16:.0f}" text-anchor="middle">c={level}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
