"""The gateway in front of a fake OpenAI-compatible upstream (a real HTTP server in the test):
output the upstream does not account for is counted with the model's tokenizer, and models whose
upstream speaks the Responses API get `/v1/responses` passed through, billed once from the
upstream's usage."""

import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, free_port, start_server, stop_server

ADMIN = "upstream-admin"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's tokenizer: "The quick brown fox" is 4 tokens, " jumps over the lazy dog" 5, "." 1.
CHUNKS = ["The quick brown fox", " jumps over the lazy dog", "."]
CHUNK_TOKENS = 10



class Upstream:
    """`/v1/chat/completions` streams CHUNKS without any `usage`; `/v1/responses` streams a
    Responses API answer whose `response.completed` carries `usage`."""

    def __init__(self):
        self.requests = []  # (path, body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if self.path == "/v1/chat/completions":
                    events = [{"id": "u1", "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in CHUNKS]
                    events.append({"id": "u1", "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                else:
                    text = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in responses_events(body))
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


UPSTREAM_USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 5},
                  "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 33}


def responses_events(request):
    """What an upstream's /v1/responses streams: its own ids, text in two deltas, usage."""
    text = ["Upstream ", "answer."]
    response = {"id": "resp_upstream_1", "object": "response", "created_at": 1, "status": "in_progress",
                "model": request["model"], "output": [], "usage": None, "store": request.get("store"),
                "previous_response_id": request.get("previous_response_id")}
    item = {"type": "message", "id": "msg_up_1", "status": "in_progress", "role": "assistant", "content": []}
    done_item = dict(item, status="completed",
                     content=[{"type": "output_text", "text": "".join(text), "annotations": []}])
    events = [
        {"type": "response.created", "response": response},
        {"type": "response.in_progress", "response": response},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", "item_id": "msg_up_1", "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": "", "annotations": []}},
    ]
    events += [{"type": "response.output_text.delta", "item_id": "msg_up_1", "output_index": 0,
                "content_index": 0, "delta": d} for d in text]
    events += [
        {"type": "response.output_text.done", "item_id": "msg_up_1", "output_index": 0, "content_index": 0,
         "text": "".join(text)},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {"type": "response.completed",
         "response": dict(response, status="completed", output=[done_item], usage=UPSTREAM_USAGE)},
    ]
    for i, e in enumerate(events):
        e["sequence_number"] = i
    return events


@pytest.fixture(scope="module")
def setup():
    upstream = Upstream()
    tmp = tempfile.mkdtemp(prefix="tollgate-upstreams-")
    config = os.path.join(tmp, "models.toml")
    with open(config, "w") as f:
        f.write(f"""
[models.counted]
source = {{ path = "{GGUF}" }}
backend = {{ type = "http", urls = ["{upstream.url}"] }}
price = {{ input_per_mtok = "1", output_per_mtok = "2", cached_input_per_mtok = "0.5" }}

[models.uncounted]
backend = {{ type = "http", urls = ["{upstream.url}"] }}

[models.passthrough]
backend = {{ type = "http", urls = ["{upstream.url}"], responses = "passthrough" }}
price = {{ input_per_mtok = "1", output_per_mtok = "2", cached_input_per_mtok = "0.5" }}
""")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN},
                       ["--config", config, "--database", os.path.join(tmp, "ledger.db")])
    http = httpx.Client(base_url=f"http://{srv.addr}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"})
    http.post("/customers", json={"id": "up-co", "name": "up"}).raise_for_status()
    key = http.post("/customers/up-co/keys", json={"name": "k"}).json()["key"]
    client = OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)
    yield srv, upstream, client, http
    assert stop_server(srv) == 0
    upstream.close()


def record(http, request_id, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for r in http.get("/usage/records", params={"limit": 1000}).json()["data"]:
            if r["id"] == request_id:
                return r
        time.sleep(0.2)
    raise AssertionError(f"no record {request_id}")


def test_output_an_upstream_does_not_report_is_counted_with_the_tokenizer(setup):
    srv, _, client, http = setup
    for model, expected in [("counted", CHUNK_TOKENS), ("uncounted", len(CHUNKS))]:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=50)
        answer = raw.parse()
        assert answer.choices[0].message.content == "".join(CHUNKS)
        assert answer.usage.completion_tokens == expected, model
        r = record(http, raw.headers["x-request-id"])
        assert (r["output_tokens"], r["usage_source"]) == (expected, "observed"), r


def test_responses_pass_through_to_an_upstream_that_speaks_them_billed_once(setup):
    srv, upstream, client, http = setup
    raw = client.responses.with_raw_response.create(
        model="passthrough", input="Hi", max_output_tokens=50, metadata={"team": "a"},
        reasoning={"effort": "low"},
    )
    r = raw.parse()
    path, sent = upstream.requests[-1]
    assert path == "/v1/responses"
    # As the client sent it (fields Tollgate would refuse when translating included), streamed
    # and stored by Tollgate, not the upstream.
    assert sent["input"] == "Hi" and sent["reasoning"] == {"effort": "low"}
    assert sent["stream"] is True and sent["store"] is False and sent["model"] == "passthrough"
    assert r.id.startswith("resp_") and r.id != "resp_upstream_1"
    assert r.model == "passthrough" and r.output_text == "Upstream answer."
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.input_tokens_details.cached_tokens) == (21, 12, 5)
    rec = record(http, raw.headers["x-request-id"])
    assert rec["endpoint"] == "/v1/responses" and rec["usage_source"] == "upstream"
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_input_tokens"]) == (21, 12, 5)
    # 16 fresh input tokens at 1 USD/Mtok, 5 cached at 0.5, 12 output at 2: 42500 nano-USD.
    assert rec["cost_usd"] == "0.000042500" and rec["tags"] == {"team": "a"}
    # Stored by Tollgate for the customer.
    assert client.responses.retrieve(r.id).output_text == "Upstream answer."


def test_streamed_passthrough_relays_the_upstreams_events(setup):
    srv, upstream, client, http = setup
    events = list(client.responses.create(model="passthrough", input="Hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.output_item.done", "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.id == events[-1].response.id != "resp_upstream_1"
    assert events[-1].response.usage.output_tokens == 12


def test_passthrough_continues_a_conversation_scoped_to_the_customer(setup):
    srv, upstream, client, http = setup
    first = client.responses.create(model="passthrough", input="Hi")
    second = client.responses.create(model="passthrough", input="More?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    _, sent = upstream.requests[-1]
    assert "previous_response_id" not in sent
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]
    assert sent["input"][1]["content"] == "Upstream answer." and sent["input"][2]["content"] == "More?"
    # Another customer cannot continue it.
    http.post("/customers", json={"id": "up-other", "name": "o"}).raise_for_status()
    other_key = http.post("/customers/up-other/keys", json={"name": "k"}).json()["key"]
    other = OpenAI(base_url=srv.base_url, api_key=other_key, max_retries=0, timeout=60)
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        other.responses.create(model="passthrough", input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
