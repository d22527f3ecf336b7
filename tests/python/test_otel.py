"""OpenTelemetry traces against a real OTLP/HTTP receiver (a small server in this test that
decodes the protobuf export requests with the `opentelemetry-proto` package): the request's
server span carries the GenAI semantic conventions and the client's `traceparent`, with child
spans for auth, limits and the engine's queue, prefill and decode; through an upstream (a real
`tollgate worker`) the trace continues over `traceparent` into the worker. Without
OTEL_EXPORTER_OTLP_ENDPOINT nothing is exported."""

import os
import secrets
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, ROOT, start_server, stop_server

MODEL = "smollm2-135m"


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: keeps every span it is sent."""

    def __init__(self, port=0):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans, lock = [], threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                spans.append(
                                    {
                                        "service": service,
                                        "path": self.path,
                                        "name": s.name,
                                        "kind": s.kind,
                                        "trace_id": s.trace_id.hex(),
                                        "span_id": s.span_id.hex(),
                                        "parent": s.parent_span_id.hex(),
                                        "start": s.start_time_unix_nano,
                                        "end": s.end_time_unix_nano,
                                        "attrs": {a.key: value(a.value) for a in s.attributes},
                                    }
                                )
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.spans, self.lock = spans, lock
        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def trace(self, trace_id, want, timeout=30):
        """The spans of `trace_id` once `want(spans)` holds."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                got = [s for s in self.spans if s["trace_id"] == trace_id]
            if want(got):
                return got
            assert time.time() < deadline, f"spans never arrived; have {[s['name'] for s in got]}"
            time.sleep(0.2)

    def close(self):
        self.http.shutdown()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def otel_env(receiver, service="tollgate"):
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": service,
    }


def traceparent():
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def by_name(spans, name):
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


SERVER, CLIENT = 2, 3  # SpanKind


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_local_requests_are_traced_with_genai_attributes_and_engine_phases(receiver):
    srv = start_server(otel_env(receiver))
    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        for stream in (False, True):
            trace_id, parent, header = traceparent()
            messages = [{"role": "user", "content": "Count to five."}]
            if stream:
                chunks = list(
                    client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=8, stream=True,
                        stream_options={"include_usage": True}, extra_headers={"traceparent": header},
                    )
                )
                usage = chunks[-1].usage
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
            else:
                r = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=8, extra_headers={"traceparent": header}
                )
                usage, finish = r.usage, r.choices[0].finish_reason
            names = {f"chat {MODEL}", "gateway.auth", "gateway.limits", "queue", "prefill", "decode"}
            spans = receiver.trace(trace_id, lambda got: names <= {s["name"] for s in got})
            server = by_name(spans, f"chat {MODEL}")
            assert server["kind"] == SERVER and server["parent"] == parent, server
            assert server["service"] == "tollgate"
            a = server["attrs"]
            assert a["gen_ai.operation.name"] == "chat"
            assert a["gen_ai.request.model"] == MODEL
            assert a["gen_ai.request.max_tokens"] == 8
            assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
            assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
            assert a["gen_ai.response.finish_reasons"] == [finish]
            assert a["http.response.status_code"] == 200 and a["http.route"] == "/v1/chat/completions"
            phases = [by_name(spans, n) for n in ("gateway.auth", "gateway.limits", "queue", "prefill", "decode")]
            for p in phases:
                assert p["parent"] == server["span_id"], p
                assert server["start"] <= p["start"] <= p["end"] <= server["end"], (p, server)
            queue, prefill, decode = phases[2:]
            # One after the other (a phase ends when the next begins, to the microsecond).
            assert queue["end"] <= prefill["start"] + 1_000_000 and prefill["end"] <= decode["start"] + 1_000_000
            # A streamed request's span lasts until its stream ends: the usage is on it.
            assert decode["end"] <= server["end"]
        # A request without traceparent starts its own trace.
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        raw.parse()
        request_id = raw.headers["x-request-id"]

        def root(got):
            return [s for s in got if s["attrs"].get("tollgate.request_id") == request_id]

        deadline = time.time() + 30
        while not root(receiver.spans):
            assert time.time() < deadline, "the span of the request without traceparent never came"
            time.sleep(0.2)
        assert root(receiver.spans)[0]["parent"] == ""
    finally:
        assert stop_server(srv) == 0


def test_traceparent_goes_upstream_and_the_worker_continues_the_trace(receiver):
    port = _free_port()
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    env = dict(os.environ, TOLLGATE_WORKER_TOKEN="worker-token", RUST_LOG="info", **otel_env(receiver, "worker"))
    worker = subprocess.Popen(
        [binary, "worker", "--model", MODEL, "--config", str(ROOT / "models.toml"), "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    srv = None
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and worker.poll() is None, "worker did not start"
            time.sleep(0.2)
        tmp = tempfile.mkdtemp(prefix="tollgate-otel-")
        config = os.path.join(tmp, "models.toml")
        with open(config, "w") as f:
            f.write(
                f'[models."{MODEL}"]\n'
                f'backend = {{ type = "http", urls = ["http://127.0.0.1:{port}"], api_key_env = "TOLLGATE_WORKER_TOKEN" }}\n'
                'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n'
            )
        srv = start_server(
            {**otel_env(receiver, "gateway"), "TOLLGATE_WORKER_TOKEN": "worker-token"},
            ["--config", config, "--no-database"],
        )
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        deadline = time.time() + 30
        while True:  # the gateway routes once its probe found the worker healthy
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
                break
            except openai.APIStatusError:
                assert time.time() < deadline
                time.sleep(0.3)
        trace_id, parent, header = traceparent()
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
            extra_headers={"traceparent": header},
        )

        def complete(got):
            names = [(s["service"], s["name"]) for s in got]
            return ("gateway", f"chat {MODEL}") in names and ("worker", f"chat {MODEL}") in names and (
                "worker", "decode") in names

        spans = receiver.trace(trace_id, complete)
        gateway = [s for s in spans if s["service"] == "gateway"]
        worker_spans = [s for s in spans if s["service"] == "worker"]
        g_server = by_name(gateway, f"chat {MODEL}")
        call = by_name(gateway, "upstream call")
        w_server = by_name(worker_spans, f"chat {MODEL}")
        assert g_server["parent"] == parent
        assert call["kind"] == CLIENT and call["parent"] == g_server["span_id"]
        assert call["attrs"]["server.address"] == f"http://127.0.0.1:{port}"
        assert call["attrs"]["http.response.status_code"] == 200
        # The worker's request is a child of the gateway's upstream call: traceparent went along.
        assert w_server["parent"] == call["span_id"]
        assert g_server["attrs"]["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
        assert by_name(worker_spans, "decode")["parent"] == w_server["span_id"]
    finally:
        if srv is not None:
            assert stop_server(srv) == 0
        worker.terminate()
        worker.wait(timeout=60)


def test_nothing_is_exported_without_the_endpoint(receiver):
    # A receiver on OTLP/HTTP's default endpoint (127.0.0.1:4318), where an exporter left
    # without an endpoint would send: that is where an export would show.
    try:
        default = Receiver(port=4318)
    except OSError as e:
        raise AssertionError(f"port 4318 is taken, so this test could not watch it: {e}")
    before = len(receiver.spans)
    try:
        srv = start_server({"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_BSP_SCHEDULE_DELAY": "100"})
        try:
            client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
            _, _, header = traceparent()
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                extra_headers={"traceparent": header}
            )
        finally:
            # The process has exited when this returns: an exporter would have flushed by then.
            assert stop_server(srv) == 0
        assert len(default.spans) == 0
        assert len(receiver.spans) == before
    finally:
        default.close()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
