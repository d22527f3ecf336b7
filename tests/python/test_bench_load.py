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
import spec  # noqa: E402
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


def test_prefill_sends_the_chat_as_a_completion_with_the_answer_begun():
    seen = []

    def answer(request):
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, text=sse({"choices": [{"text": "x", "finish_reason": "length"}]},
                                            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}))

    async def go():
        async with mock_client(answer) as client:
            return await load.timed_request(client, SERVER, args_for(workload="code-edit", prefill=True, system=True,
                                                                     file_lines=60, max_tokens=50, run_id="0000"), (0, 1, 1, 0))

    record = asyncio.run(go())
    assert record["error"] is None and record["completion_tokens"] == 1
    path, body = seen[0]
    msgs, file = workloads.request("code-edit", (0, 1, 1, 0), file_lines=60, system=True)
    assert path == "/v1/completions" and "messages" not in body and body["max_tokens"] == 50
    assert body["prompt"].startswith(f"<|im_start|>system\n{workloads.SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert body["prompt"].endswith("<|im_start|>assistant\n" + file.split("\n", 1)[0] + "\n")
    assert user_text(msgs) in body["prompt"]


# --- bench/spec.py: speculation on and off beside llama.cpp (its pieces that need no server) ---


def spec_args(*argv):
    return spec.parser().parse_args(["--bin", "/x/tollgate", "--llama-server", "/x/llama-server", "--gguf", "/m.gguf",
                                     *argv])


def test_spec_configures_tollgate_off_and_on_in_models_toml(tmp_path):
    import tomllib

    for draft in (0, 8):
        config = tomllib.loads(open(spec.tollgate_config(str(tmp_path), draft, 2, "/m/x.gguf")).read())
        model = config["models"][spec.MODEL]
        assert model["backend"]["speculative_draft"] == draft and model["backend"]["speculative_max_batch"] == 2
        assert model["source"] == {"path": "/m/x.gguf"}  # the file llama.cpp's server loads
    config = tomllib.loads(open(spec.tollgate_config(str(tmp_path), 8)).read())
    assert config["models"][spec.MODEL]["source"]["path"] == spec.DEFAULT_GGUF and "speculative_max_batch" not in (
        config["models"][spec.MODEL]["backend"])


def test_spec_runs_llama_cpp_without_speculation_and_with_each_setting_on_32_slots():
    args = spec_args("--spec-types", "ngram-simple,ngram-mod")
    servers = spec.servers_of(args)
    assert [s["label"] for s in servers] == [spec.OFF, spec.ON, "llama.cpp", "llama.cpp ngram-simple", "llama.cpp ngram-mod"]
    assert [s["index"] for s in servers] == list(range(5))
    plain, mod = (spec.llama_command(args, servers[i], 9) for i in (2, 4))
    for cmd in (plain, mod):
        assert cmd[cmd.index("-np") + 1] == str(bench_servers.TOLLGATE_SLOTS) and "-kvu" in cmd
        assert cmd[cmd.index("-m") + 1] == "/m.gguf"
    assert "--spec-type" not in plain and mod[mod.index("--spec-type") + 1] == "ngram-mod"


def test_spec_phases_send_the_same_greedy_prompts_to_every_server_and_run_to_length():
    args = spec_args("--code-tokens", "300", "--requests-single", "3", "--requests-multi", "16")
    phases = {p[0]: p for p in spec.PHASES}
    code = spec.level_args(args, phases["code-edit c=1"])
    assert (code.requests, code.max_tokens, code.share_prompts, code.ban_tokens) == (3, 300, "servers", "0,2")
    assert spec.level_args(args, phases["prose c=16"]).requests == 16
    assert code.prefill and not code.prediction
    chat = spec.level_args(args, phases["code-edit+prediction c=1"])
    assert chat.prediction and not chat.prefill
    assert [s["label"] for s in spec.servers_of(args) if spec.runs_on(phases["code-edit chat c=1"], s)] == [spec.OFF, spec.ON]
    a, b = (load.chat_body(code, "m", workloads.request("code-edit", (s, 1, 1, 0), "servers", system=True)[0], 300)
            for s in (0, 5))
    assert a == b and a["temperature"] == 0 and a["logit_bias"] == {"0": -100, "2": -100}


def test_spec_reads_tollgate_engine_counters_from_metrics():
    text = ('# HELP tollgate_engine_steps_total x\ntollgate_engine_steps_total{model="a"} 10\n'
            'tollgate_engine_steps_total{model="b"} 5\ntollgate_decode_tokens_total 7\ntollgate_queue_depth 1\n')
    assert spec.counters_of(text) == {"tollgate_engine_steps_total": 15, "tollgate_decode_tokens_total": 7}


def spec_doc(rates, errors=(), changed=(), short=()):
    """A result of two rounds of two requests: `rates[(phase, label)]` is each request's decode
    tok/s; the first request of round 1 fails on the servers of `errors`, the outputs of
    `changed` differ from Tollgate off's, the requests of `short` end earlier."""
    servers = spec.servers_of(spec_args("--spec-types", "ngram-mod"))
    index = {s["label"]: s["index"] for s in servers}
    runs, requests = [], []
    for (phase, label), rate in rates.items():
        level = 16 if "16" in phase else 1
        for rnd in (1, 2):
            runs.append({"phase": phase, "server": index[label], "round": rnd, "level": level, "wall_s": 10.0,
                         "engine": {"tollgate_decode_tokens_total": 50} if label == spec.ON else {}})
            for i in range(2):
                failed = (phase, label) in errors and (rnd, i) == (1, 0)
                r = record(index[label], i, tokens=101, rnd=rnd, level=level, error="HTTP 500" if failed else None)
                r.update(phase=phase, decode_tok_per_s=rate, output_sha1="x" + str((phase, label) in changed))
                if (phase, label) in short:
                    r["completion_tokens"] = 90
                requests.append(r)
    return {"servers": servers, "phases": [p[0] for p in spec.PHASES], "runs": runs, "requests": requests}


RATES = {("code-edit c=1", spec.OFF): 100.0, ("code-edit c=1", spec.ON): 300.0,
         ("code-edit c=1", "llama.cpp"): 90.0, ("code-edit c=1", "llama.cpp ngram-mod"): 120.0,
         ("code-edit chat c=1", spec.OFF): 100.0, ("code-edit chat c=1", spec.ON): 110.0,
         ("code-edit+prediction c=1", spec.ON): 450.0,
         ("prose c=1", spec.OFF): 200.0, ("prose c=1", spec.ON): 196.0}


def test_spec_report_gives_the_issue_ratios_with_their_goals():
    lines = spec.report(spec_doc(RATES))
    text = "\n".join(lines)
    assert "code-edit c=1: on/off 3.00x (goal >= 2.0x); on/best llama.cpp speculative (llama.cpp ngram-mod) 2.50x (goal >= 1.3x)" in text
    # The prediction phase against Tollgate off on the same chat requests without it.
    assert "code-edit+prediction c=1: on/off 4.50x (goal >= 3.0x)" in text
    assert "prose c=1: on/off 0.98x (goal >= 0.97x)" in text
    # 4 requests of 101 tokens (100 after the first) over 100 decode rows.
    assert "tollgate-on 300.0 (4.00 tokens/decode pass)" in text
    assert "code-edit chat c=1: on/off 1.10x" in text
    assert "tollgate-on: 0 of 16 outputs differ from tollgate-off's (all byte-identical)" in text


def test_spec_report_refuses_ratios_over_errors_and_flags_changed_outputs_and_other_work():
    doc = spec_doc(RATES, errors={("code-edit c=1", "llama.cpp ngram-mod")},
                   changed={("prose c=1", spec.ON)}, short={("code-edit c=1", "llama.cpp")})
    text = "\n".join(spec.report(doc))
    assert "on/off 3.00x (goal >= 2.0x); on/best llama.cpp speculative: no ratio: errors on a side" in text
    assert "llama.cpp ngram-mod 120.0 ERRORS 1" in text
    assert "tollgate-on: 4 of 16 outputs differ from tollgate-off's (speculation changed an output)" in text
    assert "llama.cpp: 4 of 4 requests differ from tollgate-off in finish_reason or completion_tokens" in text


def test_spec_replot_prints_the_report_from_the_result_file_alone(tmp_path):
    result = tmp_path / "spec.json"
    result.write_text(load.result_text(spec_doc(RATES)))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "spec.py"), "--replot", str(result)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "code-edit c=1: on/off 3.00x" in run.stdout


def test_spec_a_server_that_does_not_start_is_recorded_as_errors_and_the_run_goes_on(tmp_path):
    args = spec_args("--requests-single", "2")
    args.bin = "/bin/false"
    server = spec.servers_of(args)[0]
    run, records = spec.measure(args, server, spec.PHASES[0], 1, 0, str(tmp_path))
    assert run["slots"] == [None, "not started"] and len(records) == 2
    assert all(r["error"].startswith("the server did not start") and r["phase"] == "code-edit c=1" for r in records)
