"""`service_tier` through the official OpenAI SDK: `auto`, `default`, `flex`, `priority` on chat
completions, completions and responses; the answer (and every stream chunk) names the tier that
served it, and the usage record carries it and its prices (flex at half the default prices of
models.toml's smollm2-135m). `priority` needs the customer's permission, which a key may narrow;
`batch` (the Batch API's own) and OpenAI's `scale` are refused with 400s naming the field. A
customer's or key's `default_service_tier` is what `auto` means."""

import json
import os
import sqlite3
import subprocess
import tempfile
import time
from decimal import Decimal

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, start_server, stop_server

ADMIN = "tiers-admin-token"
MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def srv():
    db = os.path.join(tempfile.mkdtemp(prefix="tollgate-tiers-"), "ledger.db")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", db])
    s.db, auth = db, {"Authorization": f"Bearer {ADMIN}"}
    s.admin = httpx.Client(base_url=f"http://{s.addr}", headers=auth, timeout=60)
    yield s
    assert stop_server(s) == 0


def key_for(srv, customer, **key_fields):
    r = srv.admin.post(f"/admin/v1/customers/{customer}/keys", json={"name": "k", **key_fields})
    assert r.status_code == 201, r.text
    return OpenAI(base_url=f"http://{srv.addr}/v1", api_key=r.json()["key"], max_retries=0, timeout=120)


def record(srv, request_id, timeout=30):
    """The admin API's record of a request, and its stored `service_tier`, once written."""
    deadline = time.time() + timeout
    while True:
        page = srv.admin.get("/admin/v1/usage/records", params={"limit": 500}).json()["data"]
        mine = [r for r in page if r["id"] == request_id]
        if mine:
            with sqlite3.connect(srv.db) as conn:
                (tier,) = conn.execute(
                    "SELECT service_tier FROM usage_records WHERE id = ?", (request_id,)
                ).fetchone()
            return mine[0], tier
        assert time.time() < deadline, f"no record of {request_id}"
        time.sleep(0.2)


def test_flex_is_served_named_and_billed_at_the_flex_price(srv):
    assert srv.admin.post("/admin/v1/customers", json={"id": "tier-co"}).status_code == 201
    client = key_for(srv, "tier-co")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0, service_tier="flex"
    )
    response = raw.parse()
    assert response.service_tier == "flex"
    rec, tier = record(srv, raw.headers["x-request-id"])
    assert tier == "flex"
    # models.toml: 0.05 / 0.10 USD per million tokens by default; flex is half.
    assert Decimal(rec["input_price_per_mtok"]) == Decimal("0.025")
    assert Decimal(rec["output_price_per_mtok"]) == Decimal("0.05")
    expected = (Decimal(rec["input_tokens"]) * Decimal("0.025") + Decimal(rec["output_tokens"]) * Decimal("0.05")) / 10**6
    assert Decimal(rec["cost_usd"]) == expected.quantize(Decimal("0.000000001"))

    # Without service_tier (and with `auto`): `default`.
    for asked in [openai.NOT_GIVEN, "auto", "default"]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK, max_tokens=4, temperature=0, service_tier=asked
        )
        assert raw.parse().service_tier == "default", asked
    rec, tier = record(srv, raw.headers["x-request-id"])
    assert tier == "default" and Decimal(rec["output_price_per_mtok"]) == Decimal("0.10")


def test_every_chunk_and_every_endpoint_names_the_tier(srv):
    client = key_for(srv, "tier-co")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, temperature=0, service_tier="flex", stream=True,
        stream_options={"include_usage": True},
    ))
    assert len(chunks) > 2 and all(c.service_tier == "flex" for c in chunks), [c.service_tier for c in chunks]
    # The SDK's legacy completions have no `service_tier` argument: sent as an extra field.
    flex = {"service_tier": "flex"}
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, extra_body=flex)
    assert text.model_extra["service_tier"] == "flex"
    text_chunks = list(client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, extra_body=flex, stream=True
    ))
    assert text_chunks and all(c.model_extra["service_tier"] == "flex" for c in text_chunks)
    response = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=8, service_tier="flex")
    assert response.service_tier == "flex"
    events = list(client.responses.create(
        model=MODEL, input="Say hi.", max_output_tokens=8, service_tier="flex", stream=True
    ))
    with_response = [e for e in events if getattr(e, "response", None) is not None]
    assert with_response and all(e.response.service_tier == "flex" for e in with_response)


def test_priority_needs_the_permission_and_a_key_narrows_it(srv):
    client = key_for(srv, "tier-co")
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, service_tier="priority")
    assert e.value.status_code == 403 and e.value.body["param"] == "service_tier"
    assert e.value.body["type"] == "permission_error"

    r = srv.admin.patch("/admin/v1/customers/tier-co", json={"allow_priority": True})
    assert r.status_code == 200 and r.json()["allow_priority"] is True, r.text
    allowed = key_for(srv, "tier-co")
    assert allowed.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, service_tier="priority"
    ).service_tier == "priority"
    narrowed = key_for(srv, "tier-co", allow_priority=False)
    with pytest.raises(openai.PermissionDeniedError):
        narrowed.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, service_tier="priority")
    # A key that may not widen: its customer's permission taken back, the key's `true` is not enough.
    r = srv.admin.patch("/admin/v1/customers/tier-co", json={"allow_priority": False})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.PermissionDeniedError):
        key_for(srv, "tier-co", allow_priority=True).chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, service_tier="priority"
        )


def test_batch_scale_and_nonsense_are_refused_naming_the_field(srv):
    client = key_for(srv, "tier-co")
    for bad in ["batch", "scale", "fast", 3]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, service_tier=bad)
        assert e.value.body["param"] == "service_tier", (bad, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", service_tier="batch")
    assert e.value.body["param"] == "service_tier"


def test_auto_is_the_keys_default_else_the_customers(srv):
    r = srv.admin.post("/admin/v1/customers", json={"id": "flexy", "default_service_tier": "flex"})
    assert r.status_code == 201 and r.json()["default_service_tier"] == "flex", r.text
    assert key_for(srv, "flexy").chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4
    ).service_tier == "flex"
    keyed = key_for(srv, "flexy", default_service_tier="default")
    assert keyed.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, service_tier="auto"
    ).service_tier == "default"
    # `priority` as a default without the permission: `auto` falls back to `default`, never 403.
    r = srv.admin.post("/admin/v1/customers/flexy/keys", json={"default_service_tier": "priority"})
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["default_service_tier"] == "priority" and k["allow_priority"] is True
    no_perm = OpenAI(base_url=f"http://{srv.addr}/v1", api_key=k["key"], max_retries=0, timeout=120)
    assert no_perm.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).service_tier == "default"
    # `reserved` is a reservation's own (not billed per token): never a default.
    for bad in ["batch", "scale", "reserved", 1]:
        r = srv.admin.patch("/admin/v1/customers/flexy", json={"default_service_tier": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "default_service_tier", (bad, r.text)
    r = srv.admin.patch(f"/admin/v1/keys/{k['id']}", json={"allow_priority": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allow_priority", r.text
    r = srv.admin.patch("/admin/v1/customers/flexy", json={"default_service_tier": None})
    assert r.status_code == 200 and r.json()["default_service_tier"] is None


def test_the_cli_sets_and_checks_the_tier_settings(srv):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))

    def cli(*args):
        return subprocess.run([binary, *args, "--database", srv.db], capture_output=True, text=True, timeout=60)

    out = cli("customers", "create", "cli-tier", "--default-service-tier", "flex", "--allow-priority", "true")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["default_service_tier"], shown["allow_priority"]) == ("flex", True)
    out = cli("keys", "create", "cli-tier", "--allow-priority", "false", "--default-service-tier", "default")
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout)
    assert (key["default_service_tier"], key["allow_priority"]) == ("default", False)
    out = cli("keys", "update", key["id"], "--default-service-tier", "none")
    assert out.returncode == 0 and json.loads(out.stdout)["default_service_tier"] is None, out.stderr
    out = cli("customers", "update", "cli-tier", "--default-service-tier", "batch")
    assert out.returncode != 0 and "--default-service-tier" in out.stderr
    seen = srv.admin.get("/admin/v1/customers/cli-tier").json()
    assert (seen["default_service_tier"], seen["allow_priority"]) == ("flex", True)


def test_requests_within_a_reservation_run_reserved_and_beyond_it_at_the_tier_asked():
    tmp = tempfile.mkdtemp(prefix="tollgate-reserved-")
    config = os.path.join(tmp, "models.toml")
    with open(config, "w") as f:
        f.write(
            f'[models."{MODEL}"]\n'
            f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
            'backend = { type = "local", device = "cpu" }\n'
            'capacity_tpm = 100000\n'
            'price = { input_per_mtok = "0.05", output_per_mtok = "0.10", reserved_per_ktpm_month = "3" }\n'
        )
    db = os.path.join(tmp, "ledger.db")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", db, "--config", config])
    s.db = db
    s.admin = httpx.Client(base_url=f"http://{s.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    try:
        assert s.admin.post("/admin/v1/customers", json={"id": "res-co"}).status_code == 201
        client = key_for(s, "res-co")
        # No reservation yet: the tier asked, billed per token.
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
        assert raw.parse().service_tier == "default"
        r = s.admin.post(
            "/admin/v1/customers/res-co/reservations",
            json={"model": MODEL, "reserved_tokens_per_minute": 300},
        )
        assert r.status_code == 201, r.text
        # A prompt of about 30 tokens and 8 more: within the 300 of any minute.
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
        assert raw.parse().service_tier == "reserved"
        rec, tier = record(s, raw.headers["x-request-id"])
        assert tier == "reserved" and Decimal(rec["cost_usd"]) == 0, rec
        assert rec["output_tokens"] > 0
        # One that may take 400 tokens cannot fit 300 a minute: run and billed at flex, as asked.
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK, max_tokens=400, temperature=0, service_tier="flex"
        )
        assert raw.parse().service_tier == "flex"
        rec, tier = record(s, raw.headers["x-request-id"])
        assert tier == "flex" and Decimal(rec["cost_usd"]) > 0, rec
        # Ended: per token again.
        rid = r.json()["id"]
        assert s.admin.delete(f"/admin/v1/reservations/{rid}").status_code == 200
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
        assert raw.parse().service_tier == "default"
    finally:
        s.admin.close()
        assert stop_server(s) == 0
