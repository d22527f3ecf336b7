#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (Tollgate, llama.cpp's server, vLLM, ...).

Runs a fixed number of streamed chat requests at each concurrency level and prints, per level:
aggregate output tokens/s, time to first token p50/p99, inter-token latency p50/p99, request
latency p50/p99, errors, the prompt tokens the server says came from its cache, and the
server's peak RSS when --pid names a local process. A p99 needs at least 100 requests at a
level (pooled over the rounds); with fewer it is reported as `n/a (N requests)`. Token counts
come from the server's `usage` (stream_options.include_usage); when a server does not send
usage, content chunks are counted instead.

    bench/load.py --base-url http://127.0.0.1:8080/v1 --api-key KEY --model smollm2-135m \
        --levels 1,4,8,16 --requests 100 --json out.json --svg out.svg

Workloads (`--workload`): `chat` (short questions, 128 tokens), `prose` (an original essay,
512 tokens: nothing in the prompt to copy) and `code-edit` (a ~300-line Python module made
from templates, to be returned whole with one function renamed; greedy, `max_tokens` enough for
the whole file, end tokens not banned; `--prediction` sends the file as OpenAI's
`prediction: {"type": "content", ...}`, and a server that refuses it is reported as errors;
`--prefill` sends the chat as one ChatML prompt to /v1/completions with the answer begun with
the file's first line: the development model describes the file in a chat answer, and copies
it only so).
Every prompt is unique across levels, rounds and servers (its first line is a tag naming them);
what a request asks (its question, file or words) depends on its round, level and index only, so
both servers do the same work. `--share-prompts servers` gives both servers the very same
prompts, `--share-prompts all` repeats the same prompts at every level and round (a warm prefix
cache, on purpose). `--system` puts the system message the development model needs before
every request, `--system-tokens N` one shared system prompt of about N tokens (what a prefix
cache serves), `--prompt-tokens N` makes each request's own prompt about N tokens long (a long
context). Per level the decode speed after the first token is reported as well (p50 over
requests). Every request opens a new connection (no keep-alive). A stream that ends without a
finish_reason and `data: [DONE]` is counted as an error.

A second server (`--peer-url`, `--peer-model`, `--peer-api-key`, `--peer-label`) runs the same
levels; the two take turns going first, from level to level and from round to round (round 1:
the first server first at the first level, the peer at the second, ...; round 2 the other way
round). Per level the ratios of the medians are printed, none where either side had errors,
and the requests whose finish_reason or completion_tokens differ between the two are reported.
Tollgate may run `--slots` sequences at once (its engine's `max_running`, 32); the peer's slots
are read from its /props (llama.cpp's `total_slots`) or given with `--peer-slots` (start
llama.cpp's server with `--parallel` as many), and a warning is printed when the two differ:

    bench/load.py --base-url http://127.0.0.1:8080/v1 --model smollm2-135m --label tollgate \
        --peer-url http://127.0.0.1:8081/v1 --peer-model smollm2 --peer-label llama.cpp \
        --peer-settings "llama-server -t 2 --parallel 32 -c 262144" \
        --levels 1 --requests 100 --prompt-tokens 1000 --rounds 2 --json r.json --svg long.svg

`--json` writes the raw result: the command line, the commit (and whether the tree was dirty),
the CPU and its SIMD flags, each server's models, slots, version and settings, and every
request's figures; `bench/load.py --replot r.json --svg out.svg` prints the table and redraws
the chart from that file alone.

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
import hashlib
import json
import os
import sys
import time

import httpx

from compare import MIN_P99_REQUESTS, level_row, pct, report, row_line, summarize, svg_plot
from provenance import provenance
from servers import TOLLGATE_SLOTS, RssSampler, describe_servers
from workloads import PROMPTS, SHARES, SYSTEM, WORKLOADS, chatml, filler, request

DEFAULT_MAX_TOKENS = {"chat": 128, "prose": 512}


def messages(args, i, unique):
    """The tenant workloads' prompts (--two-tenants, --customer-keys)."""
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


def chat_body(args, model, msgs, max_tokens):
    body = {
        "model": model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_tokens:
        body["logit_bias"] = {t.strip(): -100 for t in args.ban_tokens.split(",")}
    return body


async def stream_chat(client, body):
    """Sends one streamed chat request (a completion where `body` has a `prompt`) and returns
    its raw figures; raises on an HTTP error or an error event in the stream."""
    start = time.perf_counter()
    token_times, usage, finish, timings, done = [], None, None, None, False
    text = hashlib.sha1()
    path = "/completions" if "prompt" in body else "/chat/completions"
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            if chunk.get("usage"):
                usage = chunk["usage"]
            timings = chunk.get("timings") or timings  # llama.cpp's server
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content") or choice.get("text")
                if content:
                    token_times.append(time.perf_counter())
                    text.update(content.encode())
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    if not (done and finish):
        # A stream cut short is a failed request, not a short answer.
        raise RuntimeError(f"the stream ended without {'data: [DONE]' if finish else 'a finish_reason'} "
                           f"after {len(token_times)} content chunks")
    tokens = usage["completion_tokens"] if usage else len(token_times)
    details = (usage or {}).get("prompt_tokens_details") or {}
    first = token_times[0] if token_times else end
    return {
        "finish_reason": finish,
        "completion_tokens": tokens,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        # None where the server does not report it.
        "cached_tokens": details.get("cached_tokens"),
        "completion_tokens_details": (usage or {}).get("completion_tokens_details"),
        # llama.cpp's server: draft tokens of its speculation, and those of them kept.
        "draft_n": (timings or {}).get("draft_n"),
        "draft_n_accepted": (timings or {}).get("draft_n_accepted"),
        # The answer's text (its SHA-1), to compare two servers' outputs without keeping them.
        "output_sha1": text.hexdigest(),
        "ttft_s": first - start,
        "latency_s": end - start,
        "decode_tok_per_s": (tokens - 1) / (end - first) if len(token_times) > 1 and end > first else None,
        "itl_ms": [round((b - a) * 1e3, 3) for a, b in zip(token_times, token_times[1:])],
    }


async def one_request(client, args, i, unique):
    """One request of the tenant workloads, in their figures' units."""
    r = await stream_chat(client, chat_body(args, args.model, messages(args, i, unique), args.max_tokens))
    return {"tokens": r["completion_tokens"], "ttft": r["ttft_s"], "itl": [x / 1e3 for x in r["itl_ms"]],
            "latency": r["latency_s"], "decode": r["decode_tok_per_s"], "prompt_tokens": r["prompt_tokens"],
            "cached_tokens": r["cached_tokens"] or 0}


async def timed_request(client, server, args, key):
    """One request of the levels' workloads, by its key (server, round, level, index): its raw
    figures, or the error that ended it."""
    msgs, file = request(args.workload, key, args.share_prompts, args.prompt_tokens, args.system_tokens,
                         args.file_lines, args.run_id, getattr(args, "system", False))
    max_tokens = args.max_tokens or (len(file) // 3 + 128 if file else DEFAULT_MAX_TOKENS[args.workload])
    body = chat_body(args, server["model"], msgs, max_tokens)
    if getattr(args, "prefill", False) and file:
        # The answer begun with the file's first line, on /v1/completions (no `prediction` there).
        del body["messages"]
        body["prompt"] = chatml(msgs, file.split("\n", 1)[0] + "\n")
    if args.prediction:
        body["prediction"] = {"type": "content", "content": file}
    record = {"server": key[0], "round": key[1], "level": key[2], "index": key[3], "error": None}
    try:
        record.update(await stream_chat(client, body))
    except Exception as e:  # noqa: BLE001 - every failure is counted and kept
        record.update(error=str(e) or type(e).__name__, finish_reason=None, completion_tokens=None,
                      prompt_tokens=None, cached_tokens=None, itl_ms=[])
    return record


def level_client(server, level):
    """The client of one server's level: a new connection per request (no keep-alive), as a
    new client would open it; llama.cpp's server closes idle keep-alive connections, and a
    client reusing one sees errors that are not the server's capacity."""
    headers = {"Authorization": f"Bearer {server['api_key']}"} if server["api_key"] else {}
    limits = httpx.Limits(max_connections=level + 4, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=server["base_url"], headers=headers, timeout=1800, limits=limits)


async def run_level(server, args, rnd, level):
    """`--requests` requests at `level` concurrency against one server: (records, wall seconds)."""
    async with level_client(server, level) as client:
        queue, records = list(range(args.requests)), []

        async def worker():
            while queue:
                i = queue.pop(0)
                records.append(await timed_request(client, server, args, (server["index"], rnd, level, i)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(level)))
        wall = time.perf_counter() - start
    return sorted(records, key=lambda r: r["index"]), wall


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
            json.dump({**provenance(), "label": args.label, "customers": row}, f, indent=2)


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
            json.dump({**provenance(), "label": args.label, "b_alone": b_alone, "a_alone": a_alone, "both": both}, f, indent=2)


def turns(servers, rnd, position=0):
    """The order the servers run the `position`-th (0-based) level of round `rnd` (1-based) in:
    rotated by one from level to level and from round to round, so that even a run of one round
    alternates which goes first, and a level run in as many rounds as servers has each of them
    first once (two servers: round 1's first level the first server first, its second level the
    peer first, round 2 the other way round)."""
    servers = list(servers)
    k = (rnd - 1 + position) % len(servers) if servers else 0
    return servers[k:] + servers[:k]


def run_levels(args):
    levels = [int(x) for x in args.levels.split(",")]
    if args.requests * args.rounds < MIN_P99_REQUESTS:
        print(f"note: {args.requests} requests per level in {args.rounds} round(s): the p99s need "
              f"{MIN_P99_REQUESTS} (over the rounds) and are reported as n/a below that", file=sys.stderr, flush=True)
    servers = describe_servers(args)
    doc = {**provenance(), "run_id": args.run_id, "workload": args.workload, "share_prompts": args.share_prompts,
           "prediction": args.prediction, "levels": levels, "requests_per_level": args.requests,
           "rounds_asked": args.rounds, "title": args.title,
           "servers": [{k: v for k, v in s.items() if k != "api_key"} for s in servers],
           "runs": [], "requests": []}
    for rnd in range(1, args.rounds + 1):
        for level_position, level in enumerate(levels):
            order = turns(servers, rnd, level_position)
            if len(servers) == 2:
                print(f"round {rnd} of {args.rounds}, c={level}: {order[0]['label']} first, then {order[1]['label']}",
                      flush=True)
            for position, server in enumerate(order):
                sampler = RssSampler(server["pid"]) if server["pid"] else None
                if sampler:
                    sampler.start()
                records, wall = asyncio.run(run_level(server, args, rnd, level))
                run = {"server": server["index"], "round": rnd, "level": level, "first": position == 0,
                       "wall_s": wall}
                if sampler:
                    sampler.stop.set()
                    sampler.join()
                    run["peak_rss_mb"] = sampler.peak / 2**20
                doc["runs"].append(run)
                doc["requests"] += records
                row = {**level_row(records, wall, level), "peak_rss_mb": run.get("peak_rss_mb")}
                print(f"round {rnd} {row_line(server['label'], row)}", flush=True)
                for e in row["error_samples"]:
                    print(f"  error: {e}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            f.write(result_text(doc))
    replot(doc, args.svg, args.title)


def result_text(doc):
    """A result as JSON: indented, but one line per request (a long run has many thousands)."""
    head = json.dumps({k: v for k, v in doc.items() if k != "requests"}, indent=1)
    rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in doc["requests"])
    return f'{head[:-2]},\n "requests": [\n{rows}\n ]\n}}\n'


def replot(doc, svg, title=None):
    """Prints a result's table and draws its chart, from the result alone."""
    summary = summarize(doc)
    for line in report(summary, [s["label"] for s in doc["servers"]]):
        print(line, flush=True)
    if svg:
        with open(svg, "w") as f:
            f.write(svg_plot(summary["medians"], title or doc.get("title") or ", ".join(summary["medians"])))


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url")
    p.add_argument("--api-key", default="")
    p.add_argument("--model")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=100, help="requests per level (a p99 needs 100)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="default: 128 (chat), 512 (prose), the file's length and more (code-edit)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (llama.cpp/vLLM extension)")
    p.add_argument("--ban-tokens", default="",
                   help="comma-separated token ids sent as logit_bias -100 (OpenAI's way to make both "
                        "servers run to max_tokens: ban the end-of-turn tokens, e.g. 0,2 for SmolLM2)")
    p.add_argument("--workload", choices=WORKLOADS, default="chat")
    p.add_argument("--share-prompts", choices=SHARES, default="none",
                   help="what the prompts share on purpose: none (unique across levels, rounds and "
                        "servers), servers (both servers get the same prompts), all (every level and "
                        "round repeats them)")
    p.add_argument("--run-id", default=os.urandom(2).hex(),
                   help="4 hex digits in every prompt's tag, so that a run repeated against the same "
                        "servers finds none of its prompts in their caches (default: random, recorded)")
    p.add_argument("--file-lines", type=int, default=300, help="code-edit: lines of the file to edit")
    p.add_argument("--prediction", action="store_true",
                   help="code-edit: send the file as OpenAI's prediction (Predicted Outputs)")
    p.add_argument("--prefill", action="store_true",
                   help="code-edit: send the chat as one ChatML prompt to /v1/completions with the answer "
                        "begun with the file's first line (the development model copies the file only then)")
    p.add_argument("--unique-prompts", action="store_true",
                   help="the tenant workloads: make every prompt unique (the levels' prompts always are)")
    p.add_argument("--pid", type=int, help="server process to sample peak RSS from")
    p.add_argument("--label", default="server")
    p.add_argument("--slots", type=int, default=TOLLGATE_SLOTS,
                   help="sequences the first server may run at once (Tollgate's engine: 32)")
    p.add_argument("--version", help="the first server's version, recorded in the result")
    p.add_argument("--settings", help="how the first server was started, recorded in the result")
    p.add_argument("--json", help="write the raw result here")
    p.add_argument("--svg")
    p.add_argument("--replot", metavar="RESULT_JSON",
                   help="print the table and draw --svg from a result file, without a server")
    p.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of about N tokens")
    p.add_argument("--system", action="store_true",
                   help=f"a system message ({SYSTEM!r}) before every request, shared on purpose: the "
                        "development model needs one (without it, its template's own makes it babble)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="each request's own prompt about N tokens long")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all levels this many times (medians reported; the servers alternate going first)")
    p.add_argument("--peer-url", "--peer-base-url", dest="peer_base_url",
                   help="a second server to run the same levels against")
    p.add_argument("--peer-model")
    p.add_argument("--peer-api-key")
    p.add_argument("--peer-label", default="peer")
    p.add_argument("--peer-pid", type=int)
    p.add_argument("--peer-slots", type=int,
                   help="the peer's slots (llama.cpp's --parallel), when its /props does not say")
    p.add_argument("--peer-version", help="the peer's version (default: llama.cpp's /props build_info)")
    p.add_argument("--peer-settings", help="how the peer was started (its command line), recorded in the result")
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
    return p


def main():
    p = parser()
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            replot(json.load(f), args.svg, args.title)
        return
    if not (args.base_url and args.model):
        p.error("--base-url and --model are required (or --replot RESULT_JSON)")
    if (args.prediction or args.prefill) and args.workload != "code-edit":
        p.error("--prediction and --prefill are for --workload code-edit")
    if args.prediction and args.prefill:
        p.error("--prediction is for chat completions, --prefill sends a completion")
    if args.workload == "code-edit" and (args.ban_tokens or args.ignore_eos):
        p.error("--workload code-edit lets the model end the file: no --ban-tokens or --ignore-eos")
    if args.customer_keys or args.two_tenants:
        args.max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS["chat"]
    if args.customer_keys:
        run_customers(args)
        return
    if args.two_tenants:
        if not (args.api_key_a and args.api_key_b):
            p.error("--two-tenants needs --api-key-a and --api-key-b (keys of two customers)")
        run_two_tenants(args)
        return
    run_levels(args)


if __name__ == "__main__":
    main()
