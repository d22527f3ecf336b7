"""Per-key and per-customer caps on requests in flight at once (`max_concurrent_requests`,
set through the admin API): a request beyond either cap is refused at once with 429,
`Retry-After` and an OpenAI-shaped `rate_limit_exceeded` error (the OpenAI SDK raises
RateLimitError), other keys and customers are unaffected, the slot is given back when a
request ends (also when its client hangs up), and a PATCH changes the cap."""

import json
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import NO_END, start_server, stop_server

ADMIN = "concurrency-admin"
MODEL = "smollm2-135m"
# A long generation that cannot end early (end tokens banned, 4,000 tokens): the slot stays
# taken while it streams, whatever the machine's speed; `holding` checks it still streams.
LONG = {
    "model": MODEL, "max_tokens": 4000, "stream": True, "temperature": 0, "logit_bias": NO_END,
    "messages": [{"role": "user", "content": "Write the letter a many times."}],
}
SHORT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def srv():
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN})
    s.admin = httpx.Client(base_url=f"http://{s.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    yield s
    assert stop_server(s) == 0


def http(srv, key):
    return httpx.Client(base_url=f"http://{srv.addr}", headers={"Authorization": f"Bearer {key}"}, timeout=120)


@contextmanager
def holding(client):
    """A streamed request in flight (its first event read) for the body of the `with`."""
    with client.stream("POST", "/v1/chat/completions", json=LONG) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        yield
        # Still streaming at the end of the body: the slot was taken throughout.
        last = next(line for line in lines if line.startswith("data:"))
        assert last != "data: [DONE]" and json.loads(last[5:])["choices"][0]["finish_reason"] is None, last


def assert_concurrency_refusal(r, names):
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded", err
    assert names in err["message"] and "concurrent" in err["message"], err


def eventually_ok(client, timeout=30):
    deadline = time.time() + timeout
    while True:
        r = client.post("/v1/chat/completions", json=SHORT)
        if r.status_code == 200 or time.time() > deadline:
            return r
        time.sleep(0.1)


def test_key_and_customer_caps(srv):
    c = srv.admin.post("/admin/v1/customers", json={"id": "cc", "max_concurrent_requests": 2})
    assert c.status_code == 201 and c.json()["max_concurrent_requests"] == 2, c.text
    k1 = srv.admin.post("/admin/v1/customers/cc/keys", json={"name": "one", "max_concurrent_requests": 1}).json()
    assert k1["max_concurrent_requests"] == 1
    k2 = srv.admin.post("/admin/v1/customers/cc/keys", json={"name": "two"}).json()
    other = srv.admin.post("/admin/v1/customers", json={"id": "cc-other"}).json()
    k3 = srv.admin.post(f"/admin/v1/customers/{other['id']}/keys", json={"name": "x"}).json()
    a, b, o = http(srv, k1["key"]), http(srv, k2["key"]), http(srv, k3["key"])

    with holding(a):
        # The key's cap (1) is reached: refused at once, whatever the endpoint.
        assert_concurrency_refusal(a.post("/v1/chat/completions", json=SHORT), k1["id"])
        assert_concurrency_refusal(a.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}), k1["id"])
        assert_concurrency_refusal(a.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1}), k1["id"])
        # The OpenAI SDK sees a RateLimitError.
        sdk = OpenAI(base_url=f"http://{srv.addr}/v1", api_key=k1["key"], max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(**SHORT)
        # Another key of the customer still has room under the customer's cap (2).
        assert b.post("/v1/chat/completions", json=SHORT).status_code == 200
        with holding(b):
            # Now the customer's cap is reached: its other key is refused too ...
            assert_concurrency_refusal(b.post("/v1/chat/completions", json=SHORT), "customer `cc`")
            # ... and another customer is not affected.
            assert o.post("/v1/chat/completions", json=SHORT).status_code == 200
    # The streams were abandoned: their slots come back.
    assert eventually_ok(a).status_code == 200
    assert eventually_ok(b).status_code == 200

    # Lifting the customer's cap through the admin API takes effect at once (this process
    # forgets the cached customer).
    r = srv.admin.patch("/admin/v1/customers/cc", json={"max_concurrent_requests": None})
    assert r.status_code == 200 and r.json()["max_concurrent_requests"] is None, r.text
    with holding(b), holding(b), holding(a):
        assert b.post("/v1/chat/completions", json=SHORT).status_code == 200
        assert_concurrency_refusal(a.post("/v1/chat/completions", json=SHORT), k1["id"])


def test_caps_are_validated(srv):
    for bad in (0, -1, "2", 1.5):
        r = srv.admin.post("/admin/v1/customers", json={"id": "bad-cap", "max_concurrent_requests": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_concurrent_requests", r.text
