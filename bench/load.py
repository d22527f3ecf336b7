#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (Tollgate, llama.cpp's server, vLLM, ...).

Runs a fixed number of streamed chat requests at each concurrency level and prints, per level:
aggregate output tokens/s, time to first token p50/p99, inter-token latency p50/p99, request
latency p50/p99, errors, and the server's peak RSS when --pid names a local process.
Token counts come from the server's `usage` (stream_options.include_usage); when a server does
not send usage, content chunks are counted instead.

    bench/load.py --base-url http://127.0.0.1:8080/v1 --api-key KEY --model smollm2-135m \
        --levels 1,4,8,16 --requests 32 --max-tokens 128 --json out.json --svg out.svg

Longer prompts: `--system-tokens N` puts one shared system prompt of about N tokens before
every request (what a prefix cache serves), `--prompt-tokens N` makes each request's own
prompt about N tokens long (a long context; unique per request). Per level the decode speed
after the first token is reported as well (p50 over requests).

A second server (`--peer-base-url`, `--peer-model`, `--peer-api-key`, `--peer-label`) runs the
same levels, alternating with the first level by level, and the ratios are printed:

    bench/load.py --base-url http://127.0.0.1:8080/v1 --model smollm2-135m --label tollgate \
        --peer-base-url http://127.0.0.1:8081/v1 --peer-model smollm2 --peer-label llama.cpp \
        --levels 1 --requests 4 --prompt-tokens 1000 --rounds 2 --svg long.svg

Tenant fairness (two customers' keys; A keeps 32 streams open, B sends short requests):

    bench/load.py --base-url ... --model smollm2-135m --two-tenants --api-key-a KA --api-key-b KB \
        [--a-streams 32] [--b-tokens 16] [--duration 40]

Many customers, each with its own system prompt (what routing a pool by customer is for):
every key in `--customer-keys` is one customer sending one request at a time for `--duration`
seconds, each request its customer's system prompt of `--system-tokens` (300 unless given)
and a short question; reported: tok/s, TTFT, and the share of prompt tokens the server says
came from its cache (`usage.prompt_tokens_details.cached_tokens`):

    bench/load.py --base-url ... --model smollm2-135m --customer-keys K1,K2,...,K16 \
        [--system-tokens 300] [--max-tokens 16] [--duration 30]

The same beside customer A holding `--a-streams` streams of `--a-tokens` tokens (its end tokens
banned with `--ban-tokens`, so they run to length): add `--api-key-a`. Reported as well: A's
inter-token latency p50/p99 and tok/s, and the total tok/s (bench/interleave.sh runs it against
a gateway with and without newcomers started between layers):

    bench/load.py --base-url ... --model smollm2-135m --customer-keys K1,...,K16 \
        --api-key-a KA --a-streams 8 --a-tokens 128 --ban-tokens 0,2 [--duration 30]
"""

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "Give me advice for learning to cook.",
    "What makes a good friend?",
    "Tell me about the history of maps.",
    "Describe a walk through a forest in autumn.",
    "Explain why the sky is blue.",
]


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class RssSampler(threading.Thread):
    """Samples VmRSS of a process (and its children are ignored) every 50 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)


WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river garden lamp"
).split()


def filler(tokens, seed):
    """About `tokens` tokens of English words (one token each for common BPE vocabularies),
    the same for the same seed."""
    out, x = [], seed * 2654435761 % 2**32 or 1
    for _ in range(tokens):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)])
    return " ".join(out)


def messages(args, i, unique):
    prompt = PROMPTS[i % len(PROMPTS)]
    if args.prompt_tokens:
        # Unique per request and per round: no prefix cache serves a long prompt twice.
        n = i + 1 + 100_000 * getattr(args, "round", 0)
        prompt = f"[{n}] {filler(args.prompt_tokens, n)}\n\n{prompt}"
    elif unique:
        prompt = f"[{i}] {prompt}"
    out = [{"role": "user", "content": prompt}]
    if args.system_tokens:
        out.insert(0, {"role": "system", "content": "You are a helpful assistant. Background: "
                       + filler(args.system_tokens, getattr(args, "system_seed", 0))})
    return out


async def one_request(client, args, i, unique):
    body = {
        "model": args.model,
        "messages": messages(args, i, unique),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_tokens:
        body["logit_bias"] = {t.strip(): -100 for t in args.ban_tokens.split(",")}
    start = time.perf_counter()
    token_times = []
    usage = None
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    token_times.append(time.perf_counter())
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(token_times)
    ttft = (token_times[0] - start) if token_times else end - start
    itl = [b - a for a, b in zip(token_times, token_times[1:])]
    decode = (tokens - 1) / (end - token_times[0]) if len(token_times) > 1 and end > token_times[0] else None
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"tokens": tokens, "ttft": ttft, "itl": itl, "latency": end - start, "decode": decode,
            "prompt_tokens": usage["prompt_tokens"] if usage else None,
            "cached_tokens": details.get("cached_tokens") or 0}


async def run_level(args, concurrency):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=600, limits=limits) as client:
        queue = list(range(args.requests))
        results, errors = [], []

        async def worker():
            while queue:
                i = queue.pop(0)
                try:
                    results.append(await one_request(client, args, i, args.unique_prompts))
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    errors.append(str(e))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    decode = [r["decode"] for r in results if r["decode"]]
    prompt_tokens = [r["prompt_tokens"] for r in results if r["prompt_tokens"]]
    return {
        "decode_tok_per_s_p50": pct(decode, 0.5),
        "prompt_tokens_p50": pct(prompt_tokens, 0.5),
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": pct([r["ttft"] for r in results], 0.5) * 1e3,
        "ttft_p99_ms": pct([r["ttft"] for r in results], 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "latency_p50_s": pct([r["latency"] for r in results], 0.5),
        "latency_p99_s": pct([r["latency"] for r in results], 0.99),
    }


async def two_tenants(args, with_a, with_b):
    """Customer A keeps `--a-streams` streams of `--max-tokens` open for `--duration` seconds
    while customer B sends `--b-tokens`-token requests one at a time; returns A's aggregate
    tok/s and B's TTFTs."""
    def client(key):
        return httpx.AsyncClient(base_url=args.base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=600, limits=httpx.Limits(max_connections=args.a_streams + 4))

    stop_at = time.perf_counter() + args.duration
    a_tokens, b_ttft, errors = [0], [], []

    async def a_stream(c, i):
        while time.perf_counter() < stop_at:
            try:
                r = await one_request(c, args, i, False)
                a_tokens[0] += r["tokens"]
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

    async def b_loop(c):
        b_args = argparse.Namespace(**{**vars(args), "max_tokens": args.b_tokens})
        i = 0
        while time.perf_counter() < stop_at:
            try:
                b_ttft.append((await one_request(c, b_args, i, True))["ttft"])
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
            i += 1

    async with client(args.api_key_a) as ca, client(args.api_key_b) as cb:
        start = time.perf_counter()
        tasks = []
        if with_a:
            tasks += [a_stream(ca, i) for i in range(args.a_streams)]
        if with_b:
            tasks.append(b_loop(cb))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {
        "a_tok_per_s": a_tokens[0] / wall if with_a else None,
        "b_requests": len(b_ttft),
        "b_ttft_p50_ms": pct(b_ttft, 0.5) * 1e3,
        "b_ttft_p99_ms": pct(b_ttft, 0.99) * 1e3,
        "b_ttft_ms": [round(t * 1e3, 1) for t in b_ttft],
        "errors": len(errors),
        "error_samples": errors[:3],
    }


async def customers(args, keys):
    """Each key's customer sends requests one at a time for `--duration` seconds, each with its
    own system prompt; with `--api-key-a`, customer A holds `--a-streams` streams meanwhile.
    Returns the aggregate figures."""
    stop_at = time.perf_counter() + args.duration
    results, errors, a_results = [], [], []

    async def a_stream(c, i):
        a_args = argparse.Namespace(**{**vars(args), "max_tokens": args.a_tokens, "system_tokens": 0})
        while time.perf_counter() < stop_at:
            try:
                a_results.append(await one_request(c, a_args, i, False))
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

    async def customer(n, key):
        mine = argparse.Namespace(**{**vars(args), "system_seed": n + 1})
        async with httpx.AsyncClient(base_url=args.base_url, timeout=600,
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            i = 0
            while time.perf_counter() < stop_at:
                try:
                    results.append(await one_request(c, mine, i, True))
                except Exception as e:  # noqa: BLE001
                    errors.append(str(e))
                i += 1

    async def with_a():
        if not args.api_key_a:
            return
        async with httpx.AsyncClient(base_url=args.base_url, timeout=600,
                                     headers={"Authorization": f"Bearer {args.api_key_a}"},
                                     limits=httpx.Limits(max_connections=args.a_streams + 4)) as c:
            await asyncio.gather(*(a_stream(c, i) for i in range(args.a_streams)))

    start = time.perf_counter()
    await asyncio.gather(with_a(), *(customer(n, k) for n, k in enumerate(keys)))
    wall = time.perf_counter() - start
    prompt = sum(r["prompt_tokens"] or 0 for r in results)
    a_itl = [x for r in a_results for x in r["itl"]]
    a_tokens = sum(r["tokens"] for r in a_results)
    return {
        "wall_s": wall,
        "a_streams": args.a_streams if args.api_key_a else 0,
        "a_requests": len(a_results),
        "a_tok_per_s": a_tokens / wall,
        "a_itl_p50_ms": pct(a_itl, 0.5) * 1e3,
        "a_itl_p99_ms": pct(a_itl, 0.99) * 1e3,
        "a_itl_samples": len(a_itl),
        "a_itl_ms": [round(x * 1e3, 2) for x in a_itl],
        "total_tok_per_s": (a_tokens + sum(r["tokens"] for r in results)) / wall,
        "customers": len(keys),
        "requests": len(results),
        "output_tok_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": pct([r["ttft"] for r in results], 0.5) * 1e3,
        "ttft_p99_ms": pct([r["ttft"] for r in results], 0.99) * 1e3,
        "prompt_tokens": prompt,
        "cached_tokens": sum(r["cached_tokens"] for r in results),
        "cached_share": sum(r["cached_tokens"] for r in results) / prompt if prompt else float("nan"),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def run_customers(args):
    keys = [k.strip() for k in args.customer_keys.split(",") if k.strip()]
    if not args.system_tokens:
        args.system_tokens = 300
    row = asyncio.run(customers(args, keys))
    print(f"{args.label} {row['customers']} customers: {row['requests']} requests, "
          f"tok/s {row['output_tok_per_s']:.1f}, TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms, "
          f"prompt tokens from the cache {row['cached_tokens']} of {row['prompt_tokens']} "
          f"({100 * row['cached_share']:.0f}%), errors {row['errors']}", flush=True)
    if args.api_key_a:
        print(f"{args.label} A ({args.a_streams} streams): {row['a_tok_per_s']:.1f} tok/s, "
              f"inter-token p50/p99 {row['a_itl_p50_ms']:.1f}/{row['a_itl_p99_ms']:.1f} ms; "
              f"total {row['total_tok_per_s']:.1f} tok/s", flush=True)
    for e in row["error_samples"]:
        print(f"  error: {e}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "customers": row}, f, indent=2)


def run_two_tenants(args):
    b_alone = asyncio.run(two_tenants(args, with_a=False, with_b=True))
    a_alone = asyncio.run(two_tenants(args, with_a=True, with_b=False))
    both = asyncio.run(two_tenants(args, with_a=True, with_b=True))
    print(f"{args.label} B alone: TTFT p50/p99 {b_alone['b_ttft_p50_ms']:.0f}/{b_alone['b_ttft_p99_ms']:.0f} ms "
          f"({b_alone['b_requests']} requests)")
    print(f"{args.label} A alone ({args.a_streams} streams): {a_alone['a_tok_per_s']:.1f} tok/s")
    print(f"{args.label} A + B: A {both['a_tok_per_s']:.1f} tok/s "
          f"({both['a_tok_per_s'] / a_alone['a_tok_per_s']:.2f} of alone), "
          f"B TTFT p50/p99 {both['b_ttft_p50_ms']:.0f}/{both['b_ttft_p99_ms']:.0f} ms "
          f"({both['b_ttft_p99_ms'] / b_alone['b_ttft_p99_ms']:.2f}x its p99 alone, {both['b_requests']} requests), "
          f"errors {both['errors'] + a_alone['errors'] + b_alone['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "b_alone": b_alone, "a_alone": a_alone, "both": both}, f, indent=2)


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


def median_row(rows):
    """The per-level medians of several rounds' rows."""
    keys = ["output_tok_per_s", "decode_tok_per_s_p50", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms"]
    out = dict(rows[0])
    for k in keys:
        values = [r[k] for r in rows if r.get(k) == r.get(k)]  # drop NaN
        out[k] = statistics.median(values) if values else float("nan")
    out["rounds"] = len(rows)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", default="")
    p.add_argument("--model", required=True)
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (llama.cpp/vLLM extension)")
    p.add_argument("--ban-tokens", default="",
                   help="comma-separated token ids sent as logit_bias -100 (OpenAI's way to make both "
                        "servers run to max_tokens: ban the end-of-turn tokens, e.g. 0,2 for SmolLM2)")
    p.add_argument("--unique-prompts", action="store_true", help="make every prompt unique (no prompt cache hits)")
    p.add_argument("--pid", type=int, help="server process to sample peak RSS from")
    p.add_argument("--label", default="server")
    p.add_argument("--json")
    p.add_argument("--svg")
    p.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of about N tokens")
    p.add_argument("--prompt-tokens", type=int, default=0, help="each request's own prompt about N tokens long")
    p.add_argument("--rounds", type=int, default=1, help="run all levels this many times (medians reported)")
    p.add_argument("--peer-base-url", help="a second server to run the same levels against")
    p.add_argument("--peer-model")
    p.add_argument("--peer-api-key")
    p.add_argument("--peer-label", default="peer")
    p.add_argument("--peer-pid", type=int)
    p.add_argument("--title", help="the SVG chart's title")
    p.add_argument("--two-tenants", action="store_true",
                   help="tenant fairness: customer A (--api-key-a) keeps --a-streams streams open while "
                        "customer B (--api-key-b) sends --b-tokens-token requests one at a time; B alone, "
                        "A alone, then both, each for --duration seconds")
    p.add_argument("--api-key-a")
    p.add_argument("--api-key-b")
    p.add_argument("--a-streams", type=int, default=32)
    p.add_argument("--b-tokens", type=int, default=16)
    p.add_argument("--a-tokens", type=int, default=128,
                   help="with --customer-keys and --api-key-a: the length of A's streams")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--customer-keys", help="comma-separated keys, one customer each, each with its own "
                   "system prompt, one request at a time for --duration seconds")
    args = p.parse_args()
    if args.customer_keys:
        run_customers(args)
        return
    if args.two_tenants:
        if not (args.api_key_a and args.api_key_b):
            p.error("--two-tenants needs --api-key-a and --api-key-b (keys of two customers)")
        run_two_tenants(args)
        return

    servers = [args]
    if args.peer_base_url:
        servers.append(argparse.Namespace(**{
            **vars(args), "base_url": args.peer_base_url, "model": args.peer_model or args.model,
            "api_key": args.peer_api_key if args.peer_api_key is not None else args.api_key,
            "label": args.peer_label, "pid": args.peer_pid}))
    rows = {s.label: {} for s in servers}
    for rnd in range(args.rounds):
        for level in [int(x) for x in args.levels.split(",")]:
            for server in servers:  # level by level, alternating, so drift hits both
                server.round = rnd
                sampler = RssSampler(server.pid) if server.pid else None
                if sampler:
                    sampler.start()
                row = asyncio.run(run_level(server, level))
                if sampler:
                    sampler.stop.set()
                    sampler.join()
                    row["peak_rss_mb"] = sampler.peak / 2**20
                rows[server.label].setdefault(level, []).append(row)
                rss = f" rss_peak={row['peak_rss_mb']:.0f}MB" if "peak_rss_mb" in row else ""
                print(
                    f"{server.label} round {rnd + 1} c={level:<3} tok/s={row['output_tok_per_s']:7.1f} "
                    f"decode p50={row['decode_tok_per_s_p50']:6.1f} tok/s "
                    f"ttft p50/p99={row['ttft_p50_ms']:7.0f}/{row['ttft_p99_ms']:7.0f} ms "
                    f"itl p50/p99={row['itl_p50_ms']:6.1f}/{row['itl_p99_ms']:6.1f} ms "
                    f"latency p50/p99={row['latency_p50_s']:6.2f}/{row['latency_p99_s']:6.2f} s "
                    f"prompt={row['prompt_tokens_p50']:.0f} tok errors={row['errors']}{rss}",
                    flush=True,
                )
                for e in row["error_samples"]:
                    print(f"  error: {e}", file=sys.stderr)
    medians = {label: [median_row(r) for r in by_level.values()] for label, by_level in rows.items()}
    if len(servers) == 2:
        ours, peer = medians[servers[0].label], medians[servers[1].label]
        for a, b in zip(ours, peer):
            print(f"c={a['concurrency']:<3} medians of {a['rounds']} rounds, {servers[0].label} / {servers[1].label}: "
                  f"tok/s {a['output_tok_per_s']:.1f} / {b['output_tok_per_s']:.1f} "
                  f"({a['output_tok_per_s'] / b['output_tok_per_s']:.2f}x), "
                  f"decode {a['decode_tok_per_s_p50']:.1f} / {b['decode_tok_per_s_p50']:.1f} "
                  f"({a['decode_tok_per_s_p50'] / b['decode_tok_per_s_p50']:.2f}x), "
                  f"TTFT p50 {a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} ms "
                  f"({a['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rows, "medians": medians}, f, indent=2)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg_plot(medians, args.title or ", ".join(medians)))


if __name__ == "__main__":
    main()
