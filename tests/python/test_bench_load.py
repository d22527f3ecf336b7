"""bench/load.py's own logic, without a server: the prompts are unique where they must be and
shared where a flag says so, the code-edit file is deterministic, output length mismatches
are found, no ratio is printed where either side had errors, a p99 of fewer than 100 requests
is `n/a`, the servers take turns going first, a refused request is reported (not raised), and
a result file alone redraws the chart (`--replot`). Fast: no model, no server."""

import asyncio
import itertools
import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import compare  # noqa: E402
import load  # noqa: E402
import servers as bench_servers  # noqa: E402
import workloads  # noqa: E402

KEYS = list(itertools.product((0, 1), (1, 2), (1, 4), range(5)))  # server, round, level, index


def user_text(msgs):
    return next(m["content"] for m in msgs if m["role"] == "user")


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_prompts_are_unique_across_servers_rounds_levels_and_requests(workload):
    prompts = [user_text(workloads.request(workload, key, file_lines=60)[0]) for key in KEYS]
    assert len(set(prompts)) == len(KEYS)
    # A second run (another run id) repeats none of them either.
    again = [user_text(workloads.request(workload, key, file_lines=60, run_id="beef")[0]) for key in KEYS]
    assert not set(prompts) & set(again)


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_both_servers_get_the_same_work(workload):
    for _, rnd, level, index in KEYS:
        a = user_text(workloads.request(workload, (0, rnd, level, index), prompt_tokens=50, file_lines=60)[0])
        b = user_text(workloads.request(workload, (1, rnd, level, index), prompt_tokens=50, file_lines=60)[0])
        # Only the tag's server letter differs.
        assert a != b and a.split("]", 1)[1] == b.split("]", 1)[1]


def test_shared_prompts_are_shared_only_as_far_as_asked():
    def prompts(share):
        return {key: user_text(workloads.request("chat", key, share)[0]) for key in KEYS}

    servers = prompts("servers")
    assert all(servers[(0, r, c, i)] == servers[(1, r, c, i)] for _, r, c, i in KEYS)
    assert len(set(servers.values())) == len(KEYS) // 2
    everything = prompts("all")
    assert len(set(everything.values())) == 5  # one per index, whatever the server, round, level


def test_system_prompt_is_shared_on_purpose():
    a = workloads.request("chat", (0, 1, 1, 0), system_tokens=30)[0]
    b = workloads.request("chat", (1, 2, 4, 3), system_tokens=30)[0]
    assert a[0]["role"] == "system" and a[0] == b[0]


def test_code_edit_file_is_deterministic_and_about_300_lines():
    text, names = workloads.code_file(7)
    assert (text, names) == workloads.code_file(7)
    assert text != workloads.code_file(8)[0]
    assert 280 <= len(text.splitlines()) <= 320
    compile(text, "generated.py", "exec")  # a real Python module
    instruction, file = workloads.code_edit(7)
    assert file == text and text in instruction
    old = names[0]
    assert f"`{old}`" in instruction and text.count(old) >= 2  # defined and called


def mock_client(handler):
    return httpx.AsyncClient(base_url="http://bench.test/v1", transport=httpx.MockTransport(handler))


def args_for(**over):
    args = load.parser().parse_args(["--base-url", "http://bench.test/v1", "--model", "m"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


SERVER = {"model": "m", "index": 0}


def test_a_refused_prediction_is_recorded_as_an_error_not_raised():
    bodies = []

    def refuse(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(400, json={"error": {"message": "prediction is not supported", "param": "prediction"}})

    async def go():
        async with mock_client(refuse) as client:
            return await load.timed_request(client, SERVER, args_for(workload="code-edit", prediction=True), (0, 1, 1, 0))

    record = asyncio.run(go())
    assert record["error"].startswith("HTTP 400") and "prediction" in record["error"]
    body = bodies[0]
    assert body["prediction"]["type"] == "content"
    assert body["prediction"]["content"] in user_text(body["messages"])
    # Greedy, room for the whole file, end tokens not banned.
    assert body["temperature"] == 0 and "logit_bias" not in body
    assert body["max_tokens"] > len(body["prediction"]["content"]) // 4


def sse(*chunks):
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_a_stream_gives_finish_reason_usage_and_cached_tokens():
    def answer(request):
        return httpx.Response(200, text=sse(
            {"choices": [{"delta": {"content": "a"}, "finish_reason": None}]},
            {"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 4}}}))

    async def go():
        async with mock_client(answer) as client:
            return await load.timed_request(client, SERVER, args_for(), (0, 1, 1, 0))

    record = asyncio.run(go())
    assert record["error"] is None
    assert (record["finish_reason"], record["completion_tokens"], record["prompt_tokens"],
            record["cached_tokens"]) == ("length", 2, 9, 4)


def record(server, index, tokens=16, finish="length", error=None, rnd=1, level=1):
    return {"server": server, "round": rnd, "level": level, "index": index, "error": error,
            "finish_reason": None if error else finish, "completion_tokens": None if error else tokens,
            "prompt_tokens": None if error else 20, "cached_tokens": None, "ttft_s": 0.01, "latency_s": 0.1,
            "decode_tok_per_s": 150.0, "itl_ms": [] if error else [5.0] * (tokens - 1)}


def test_mismatches_name_the_requests_whose_outputs_differ_in_length():
    records = [record(0, 0), record(1, 0),                          # the same
               record(0, 1, tokens=16), record(1, 1, tokens=9, finish="stop"),
               record(0, 2, finish="stop"), record(1, 2, finish="length"),
               record(0, 3), record(1, 3, error="HTTP 500")]        # not paired: an error
    found = compare.mismatches(records)
    assert [m["index"] for m in found] == [1, 2]
    assert found[0]["completion_tokens"] == [16, 9] and found[1]["finish_reason"] == ["stop", "length"]


def doc_of(records, levels=(1,), rounds=(1,)):
    runs = [{"server": s, "round": r, "level": c, "first": s == 0, "wall_s": 1.0}
            for r in rounds for c in levels for s in (0, 1)]
    return {"servers": [{"label": "tollgate"}, {"label": "peer"}], "runs": runs, "requests": records}


def test_no_ratio_where_either_side_had_errors():
    clean = [record(s, i) for s in (0, 1) for i in range(4)]
    summary = compare.summarize(doc_of(clean))
    assert summary["ratios"][0]["output_tok_per_s"] == pytest.approx(1.0)
    failed = clean[:-1] + [record(1, 3, error="HTTP 503")]
    summary = compare.summarize(doc_of(failed))
    assert all(summary["ratios"][0][k] is None for k in ("output_tok_per_s", "decode_tok_per_s_p50", "ttft_p50_ms"))
    lines = compare.report(summary, ["tollgate", "peer"])
    assert "c=1   tollgate / peer: no ratio: errors 0 / 1" in lines
    assert not any("x)" in line for line in lines)


def test_p99_needs_100_requests():
    few = compare.level_row([record(0, i) for i in range(99)], 1.0, 1)
    assert few["ttft_p99_ms"] is None and few["latency_p99_s"] is None and few["itl_p99_ms"] is None
    assert "ttft p50/p99=10/n/a (99 requests) ms" in compare.row_line("x", few)
    enough = compare.level_row([record(0, i) for i in range(100)], 1.0, 1)
    assert enough["ttft_p99_ms"] == pytest.approx(10.0)


def test_cached_tokens_are_n_a_where_the_server_does_not_report_them():
    rows = [record(0, i) for i in range(3)]
    assert compare.level_row(rows, 1.0, 1)["cached_tokens"] is None
    rows[0]["cached_tokens"] = 0
    assert compare.level_row(rows, 1.0, 1)["cached_tokens"] == 0


def test_servers_take_turns_going_first():
    servers = ["tollgate", "peer"]
    assert [load.turns(servers, r)[0] for r in (1, 2, 3, 4)] == ["tollgate", "peer", "tollgate", "peer"]


def test_slots_read_told_or_unknown():
    assert bench_servers.slots_of(32, None, "--slots")[:2] == (32, "--slots")
    assert bench_servers.slots_of(None, {"total_slots": 8}) == (8, "/props total_slots", None)
    slots, _, warning = bench_servers.slots_of(32, {"total_slots": 8})
    assert slots == 8 and "told 32" in warning
    assert bench_servers.slots_of(None, None)[0] is None and bench_servers.slots_of(None, None)[2]


def test_replot_redraws_from_the_result_file_alone(tmp_path):
    records = [record(s, i, rnd=r, level=c) for r in (1, 2) for c in (1, 2) for s in (0, 1) for i in range(3)]
    result = tmp_path / "r.json"
    result.write_text(json.dumps({**doc_of(records, levels=(1, 2), rounds=(1, 2)), "title": "t"}))
    svg = tmp_path / "out.svg"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--replot", str(result), "--svg", str(svg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "c=2   tollgate / peer: tok/s 48.0 / 48.0 (1.00x)" in run.stdout
    assert svg.read_text().startswith("<svg") and ">c=2</text>" in svg.read_text()


def test_the_result_file_is_json_with_one_line_per_request():
    doc = {**doc_of([record(s, i) for s in (0, 1) for i in range(3)]), "command": "x"}
    text = load.result_text(doc)
    assert json.loads(text) == doc
    assert sum(line.startswith('{"server":') for line in text.splitlines()) == 6


def test_the_command_line_recorded_leaves_the_keys_out():
    import provenance

    line = provenance.command_line(["load.py", "--api-key", "sk-1", "--model", "m", "--peer-api-key=sk-2",
                                    "--customer-keys", "k1,k2", "--label", "x"])
    assert line == "load.py --api-key KEY --model m --peer-api-key=KEY --customer-keys KEY --label x"


def test_prompts_stay_unique_with_more_than_two_servers():
    # bench/spec.py compares eight servers; a tag had a letter for two.
    keys = list(itertools.product(range(8), (1, 2), (1, 16), range(3)))
    prompts = [user_text(workloads.request("prose", key)[0]) for key in keys]
    assert len(set(prompts)) == len(keys)


def test_the_system_message_the_dev_model_needs_is_sent_when_asked():
    msgs = workloads.request("code-edit", (0, 1, 1, 0), file_lines=60, system=True)[0]
    assert msgs[0] == {"role": "system", "content": workloads.SYSTEM}
    assert workloads.request("code-edit", (0, 1, 1, 0), file_lines=60)[0][0]["role"] == "user"
    sent = []

    def answer(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, text=sse({"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}]}))

    async def go():
        async with mock_client(answer) as client:
            return await load.timed_request(client, SERVER, args_for(system=True), (0, 1, 1, 0))

    assert asyncio.run(go())["error"] is None
    assert sent[0]["messages"][0]["content"] == workloads.SYSTEM


def test_servers_take_turns_within_a_round_too():
    # A one-round run used to put the first server first at every level.
    two = ["tollgate", "peer"]
    assert [load.turns(two, 1, p)[0] for p in range(4)] == ["tollgate", "peer", "tollgate", "peer"]
    assert [load.turns(two, 2, p)[0] for p in range(2)] == ["peer", "tollgate"]
    many = list("abcde")
    # Over as many rounds as servers, each goes first once at a level; each order has them all.
    assert sorted(load.turns(many, r, 3)[0] for r in range(1, 6)) == many
    assert all(sorted(load.turns(many, r, p)) == many for r in (1, 2) for p in range(3))


def test_a_stream_cut_short_is_an_error():
    def cut(request):
        # Content, then the connection ends: no finish_reason, no [DONE].
        return httpx.Response(200, text="data: " + json.dumps({"choices": [{"delta": {"content": "a"}}]}) + "\n\n")

    def no_done(request):
        return httpx.Response(200, text="data: " + json.dumps(
            {"choices": [{"delta": {"content": "a"}, "finish_reason": "length"}]}) + "\n\n")

    async def go(handler):
        async with mock_client(handler) as client:
            return await load.timed_request(client, SERVER, args_for(), (0, 1, 1, 0))

    assert "finish_reason" in asyncio.run(go(cut))["error"]
    assert "[DONE]" in asyncio.run(go(no_done))["error"]


def test_a_stream_records_llama_cpp_drafts_and_the_output_digest():
    import hashlib

    def answer(request):
        return httpx.Response(200, text=sse(
            {"choices": [{"delta": {"content": "ab"}, "finish_reason": None}]},
            {"choices": [{"delta": {"content": "c"}, "finish_reason": "length"}],
             "timings": {"draft_n": 12, "draft_n_accepted": 9}},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}))

    async def go():
        async with mock_client(answer) as client:
            return await load.timed_request(client, SERVER, args_for(), (0, 1, 1, 0))

    r = asyncio.run(go())
    assert (r["draft_n"], r["draft_n_accepted"]) == (12, 9)
    assert r["output_sha1"] == hashlib.sha1(b"abc").hexdigest()


def test_every_request_opens_a_new_connection():
    """No keep-alive (llama.cpp's server closes idle ones: the client would see errors that
    are not the server's): a real socket server counts the connections of 3 requests."""
    body = sse({"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()
    connections = []

    async def serve(reader, writer):
        connections.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        writer.close()

    async def go():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "api_key": "", "index": 0}
        try:
            records, _ = await load.run_level(peer, args_for(requests=3), 1, 1)
            # Requests read to their end too (a stream left at [DONE] is closed anyway).
            async with load.level_client(peer, 1) as client:
                for _ in range(2):
                    assert (await client.post("/chat/completions", json={})).status_code == 200
            return records
        finally:
            server.close()

    records = asyncio.run(go())
    assert [r["error"] for r in records] == [None] * 3
    assert len(connections) == 5

