"""Two gateway replicas on one PostgreSQL, each with the real model: rate limits and budgets
are shared and exact across them (not twice the limit), and a key revoked through one replica
is refused by the other (at its next lookup of the key: the key cache's lifetimes are 0 here)."""

import os
import tempfile
import threading

import httpx
import openai
import pytest

from conftest import NO_END, run_concurrently, start_server, stop_server, uncached_keys_config
from billing_common import ADMIN, IN_NANO, OUT_NANO, Admin, chat, nano, pg, sdk

pytestmark = pytest.mark.skipif(
    not os.environ.get("TOLLGATE_TEST_POSTGRES"),
    reason="needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)",
)


@pytest.fixture(scope="module")
def replicas():
    url = pg("reset")
    tmp = tempfile.mkdtemp(prefix="tollgate-replicas-")
    config = uncached_keys_config(tmp)
    servers = [
        start_server(
            {"TOLLGATE_ADMIN_TOKEN": ADMIN},
            ["--config", config, "--database", url, "--spool", os.path.join(tmp, f"gw{i}.spool")],
        )
        for i in range(2)
    ]
    yield servers
    for srv in servers:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])


def post_chat_json(srv, key, text, extra):
    return httpx.post(
        f"http://{srv.addr}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "smollm2-135m", "messages": [{"role": "user", "content": text}],
              "temperature": 0, **extra},
        timeout=120,
    )


def post_chat(srv, key, text="Hi", max_tokens=1):
    return post_chat_json(srv, key, text, {"max_tokens": max_tokens})


def test_request_rate_is_shared_across_replicas(replicas):
    a, b = replicas
    Admin(a).customer("rate-co")
    key = Admin(b).key("rate-co", rpm=4)["key"]
    statuses, remaining = [], []
    for i in range(10):
        r = post_chat(replicas[i % 2], key)
        statuses.append(r.status_code)
        if r.status_code == 200:
            remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        else:
            assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            assert int(r.headers["retry-after"]) >= 1
    # 4 per minute in total, whichever replica serves: each replica alone would allow 4.
    assert statuses.count(200) == 4, statuses
    assert statuses.count(429) == 6, statuses
    # The headers report the shared bucket, whichever replica answers.
    assert remaining == [3, 2, 1, 0], remaining


def test_token_rate_is_shared_across_replicas(replicas):
    a, b = replicas
    admin = Admin(a)
    admin.customer("tpm-co")
    probe = admin.key("tpm-co")["key"]
    limited = admin.key("tpm-co", tpm=1000)["key"]
    text = "Name one colour of the rainbow. " * 8
    r = post_chat(a, probe, text)
    assert r.status_code == 200, r.text
    prompt = r.json()["usage"]["prompt_tokens"]
    assert prompt > 60
    # A request in flight holds its reservation of prompt + max_tokens = 990 of the key's 1,000
    # tokens per minute: no second such request fits, on either replica (each replica alone
    # would have a full bucket). The first streams with the end tokens banned, so it is still
    # running while the others are tried, however fast or slow the machine (a first request
    # that had finished would have given most of its reservation back).
    body = {"max_tokens": 990 - prompt}
    with httpx.stream(
        "POST", f"http://{a.addr}/v1/chat/completions",
        headers={"Authorization": f"Bearer {limited}"},
        json={"model": "smollm2-135m", "messages": [{"role": "user", "content": text}],
              "temperature": 0, "stream": True, "logit_bias": NO_END, **body},
        timeout=120,
    ) as first:
        assert first.status_code == 200, first.read()
        lines = first.iter_lines()
        next(line for line in lines if '"content"' in line)
        for srv in (b, a):
            r = post_chat_json(srv, limited, text, body)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "tokens", r.text
        still = next(line for line in lines if line.startswith("data:"))
        assert '"finish_reason":null' in still.replace(" ", ""), still


def test_budget_is_shared_across_replicas(replicas):
    a, b = replicas
    admin = Admin(a)
    # Each request may cost up to prompt (~30 tokens) × 50 + 64 × 100 nano-USD ≈ 8,000: a
    # budget of 20,000 holds two such requests at a time, whichever replica admits them.
    admin.customer("budget-co", budget_usd="0.000020000")
    key = admin.key("budget-co")["key"]
    outcomes, lock = [], threading.Lock()

    def one(i):
        client = sdk(replicas[i % 2], key)
        try:
            rid, usage, _ = chat(client, f"Tell me about the number {i}.", max_tokens=64)
            result = ("ok", rid, usage)
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota", e
            result = ("quota", None, None)
        with lock:
            outcomes.append(result)

    run_concurrently(one, 16)
    served = [o for o in outcomes if o[0] == "ok"]
    assert len(outcomes) == 16
    assert served and len(served) < 16, outcomes
    records = admin.wait_for([rid for _, rid, _ in served])
    spent = sum(records[rid]["input_tokens"] * IN_NANO + records[rid]["output_tokens"] * OUT_NANO
                for _, rid, _ in served)
    assert spent <= 20_000, spent
    customer = admin.call("GET", "/admin/v1/customers/budget-co")
    assert nano(customer["spent_usd_this_period"]) == spent


def test_key_revoked_on_one_replica_is_refused_by_the_other(replicas):
    a, b = replicas
    admin = Admin(a)
    admin.customer("revoke-co")
    created = admin.key("revoke-co")
    assert post_chat(b, created["key"]).status_code == 200
    assert post_chat(a, created["key"]).status_code == 200  # a has looked the key up too
    Admin(b).call("DELETE", f"/admin/v1/keys/{created['id']}")
    # Refused at once by the replica that revoked it.
    r = post_chat(b, created["key"])
    assert r.status_code == 401, r.text
    # The other replica looks the key up again for its next request (its key cache's lifetimes
    # are 0 in this config; the cache's own bound is tested on a manual clock in Rust), so it
    # refuses the key too.
    r = post_chat(a, created["key"])
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
