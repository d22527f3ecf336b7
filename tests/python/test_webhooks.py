"""The ends of batches as webhook events, against the real server and model with a real HTTP
receiver: `batch.failed`, `batch.completed` and `batch.cancelled` reach the customer's webhook
once each, signed with the Standard Webhooks headers (verified with the `standardwebhooks`
library and with OpenAI's SDK, as receivers do), retried until the receiver answers
2xx with the same `webhook-id`, while budget alerts keep their own headers."""

import io
import json

import httpx
import standardwebhooks
from openai import OpenAI

from conftest import customer_keys, start_server, stop_server
from test_alerts import Receiver, wait

ADMIN = "webhooks-admin"
MODEL = "smollm2-135m"
CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def jsonl(lines) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))


def line(custom_id, max_tokens=2):
    body = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "Say hi."}],
            "max_tokens": max_tokens, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def events_of(receiver, batch_id):
    """The accepted deliveries about `batch_id`: (headers, event)."""
    return [(h, json.loads(b)) for h, b in receiver.accepted() if json.loads(b)["data"]["id"] == batch_id]


def test_batch_ends_reach_the_webhook_signed_once_each():
    receiver = Receiver(fail_first=1)  # every event's first delivery gets a 500
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN})
    try:
        key = customer_keys(srv, ADMIN, ("hooked",))["hooked"]
        r = httpx.put(f"http://{srv.addr}/admin/v1/customers/hooked/alerts", json={"webhook_url": receiver.url},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert r.status_code == 200, r.text
        secret = r.json()["webhook_secret"]
        verifier = standardwebhooks.Webhook(secret)
        openai_receiver = OpenAI(api_key="unused", webhook_secret=secret).webhooks
        client = OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)

        def batch_of(lines):
            f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            return client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id

        refused = batch_of([line("a"), {"custom_id": "b", "method": "GET", "url": CHAT, "body": {}}])
        done = batch_of([line("x"), line("y")])
        ended = {}
        for batch_id, end in [(refused, "batch.failed"), (done, "batch.completed")]:
            got = wait(lambda b=batch_id: events_of(receiver, b), timeout=300, what=end)
            ended[batch_id] = got
            assert [e["type"] for _, e in got] == [end], got
        assert client.batches.retrieve(refused).status == "failed"
        assert client.batches.retrieve(done).status == "completed"

        # A batch cancelled before its lines ran (a long line keeps the runner busy first).
        long_one = batch_of([line(f"l{i}", max_tokens=200) for i in range(4)])
        cancelled = client.batches.cancel(long_one)
        assert cancelled.status in ("cancelling", "cancelled")
        got = wait(lambda: events_of(receiver, long_one), timeout=300, what="batch.cancelled")
        assert [e["type"] for _, e in got] == ["batch.cancelled"], got
        ended[long_one] = got

        for batch_id, got in ended.items():
            (headers, event), = got
            body = json.dumps(event)  # only for the shape; the signature is checked on the bytes
            assert event["object"] == "event" and event["data"] == {"id": batch_id}, body
            raw = next(b for h, b in receiver.accepted() if h["webhook-id"] == headers["webhook-id"])
            signed = {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
            verifier.verify(raw, signed)
            assert openai_receiver.unwrap(raw, signed).type == event["type"], "OpenAI's SDK verifies it too"
            assert headers["webhook-id"] == event["id"]
            assert "tollgate-signature" not in headers, "budget alerts keep their own headers"
            # The first attempt failed: the retry carried the same id.
            tries = [h for h, b, _ in receiver.deliveries if h["webhook-id"] == event["id"]]
            assert len(tries) == 2, tries
        # Nothing was delivered twice once accepted.
        ids = [h["webhook-id"] for h, _ in receiver.accepted()]
        assert len(ids) == len(set(ids)) == 3, ids
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])
        receiver.close()
