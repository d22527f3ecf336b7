"""What leaves the ledger for other systems: the CLI's keys and incremental exports,
cost-allocation tags in reports, invoices and exports, and the CloudEvents and Stripe meter-event
formats billing systems ingest."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import openai
import pytest

from conftest import ROOT
from billing_common import MODEL, Admin, ask, billing, chat, nano, sdk, tollgate

def test_cli_keys_and_incremental_export(billing):
    db = ["--database", billing.db]
    made = json.loads(tollgate("customers", "create", "cli-co", "--budget-usd", "5", *db).stdout)
    assert made["budget_usd"] == "5.000000000"
    key = json.loads(tollgate("keys", "create", "cli-co", "--name", "cron", *db).stdout)["key"]
    client = sdk(billing, key)
    first = [chat(client, f"One {i}", max_tokens=3)[0] for i in range(2)]
    admin = Admin(billing)
    admin.wait_for(first)
    cursor = Path(tempfile.mkdtemp()) / "cursor"
    out1 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    second = [chat(client, f"Two {i}", max_tokens=3)[0] for i in range(3)]
    admin.wait_for(second)
    out2 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    out3 = tollgate("usage", "export", "--cursor-file", str(cursor), "--format", "jsonl", *db).stdout
    ids1 = [json.loads(line)["id"] for line in out1.splitlines()]
    ids2 = [json.loads(line)["id"] for line in out2.splitlines()]
    assert set(first) <= set(ids1) and set(second) == set(ids2), "second run has exactly the new records"
    assert out3 == ""
    everything = [r["id"] for r in admin.records()]
    assert ids1 + ids2 == everything, "no gaps, no duplicates, ledger order"
    csv_out = tollgate("usage", "export", "--format", "csv", *db).stdout.splitlines()
    assert csv_out[0].startswith("id,customer_id,key_id,model,endpoint,stream,status")
    assert len(csv_out) == 1 + len(everything)
    invoice = json.loads(tollgate("usage", "invoice", "cli-co", *db).stdout)
    assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"]) > 0
    tollgate("keys", "revoke", json.loads(tollgate("keys", "list", "cli-co", *db).stdout)["data"][0]["id"], *db)
    # The running gateway sees a revocation made elsewhere at its next lookup: every request's (the
    # key cache's lifetimes are 0 in this config).
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)



# ---- cost-allocation tags --------------------------------------------------------------------


def test_tags_from_metadata_user_and_key_defaults(billing):
    admin = Admin(billing)
    admin.customer("tag-co")
    key_a = admin.key("tag-co", tags={"team": "ml", "project": "ops"})
    key_b = admin.key("tag-co")
    a, b = sdk(billing, key_a["key"]), sdk(billing, key_b["key"])
    expected = {}  # request id -> tags the record must carry

    raw = a.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("Hi"), max_tokens=3, temperature=0,
        metadata={"project": "alpha", "env": "prod"}, user="u-1",
    )
    # The key's defaults win over the request's metadata (project), the rest is merged.
    expected[raw.headers["x-request-id"]] = {"team": "ml", "project": "ops", "env": "prod", "user": "u-1"}
    for i, stream in enumerate([False, True]):
        rid, _, _ = chat(b, f"Colour {i}", max_tokens=3, stream=stream, metadata={"project": "alpha"}, user="u-2")
        expected[rid] = {"project": "alpha", "user": "u-2"}
    raw = b.completions.with_raw_response.create(
        model=MODEL, prompt="Bread is", max_tokens=3, temperature=0, user="u-3",
        extra_body={"metadata": {"project": "beta"}},
    )
    expected[raw.headers["x-request-id"]] = {"project": "beta", "user": "u-3"}
    rid, _, _ = chat(b, "No tags", max_tokens=2)
    expected[rid] = {}

    # Limits: 16 pairs, keys up to 64 and values up to 512 characters; a 400 names the field.
    bad = [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"k": "v" * 513}, "metadata.k"),
    ]
    for metadata, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            b.chat.completions.create(model=MODEL, messages=ask("x"), max_tokens=2, metadata=metadata)
        assert e.value.param == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        b.chat.completions.create(model=MODEL, messages=ask("x"), max_tokens=2, metadata={"k": 5})
    assert e.value.param.startswith("metadata"), e.value.body
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    rid = b.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("x"), max_tokens=2, metadata=ok
    ).headers["x-request-id"]
    expected[rid] = ok

    records = admin.wait_for(list(expected))
    for rid, tags in expected.items():
        assert records[rid]["tags"] == tags, records[rid]
    mine = [r for r in admin.records() if r["customer_id"] == "tag-co"]
    assert len(mine) == len(expected), "refused requests leave no record"

    # Reports group and filter by a tag; every figure adds up to the records.
    rows = admin.call("GET", "/admin/v1/usage", params={"customer_id": "tag-co", "group_by": "tag:project"})["data"]
    by_project = {row["tag:project"]: row for row in rows}
    projects = {r["tags"].get("project") for r in mine}
    assert set(by_project) == projects
    for project, row in by_project.items():
        theirs = [r for r in mine if r["tags"].get("project") == project]
        assert row["requests"] == len(theirs)
        assert nano(row["cost_usd"]) == sum(nano(r["cost_usd"]) for r in theirs)
    alpha = admin.call("GET", "/admin/v1/usage", params={"customer_id": "tag-co", "tag": "project:alpha"})["data"][0]
    assert alpha["requests"] == 2
    csv_text = admin.call(
        "GET", "/admin/v1/usage", params={"customer_id": "tag-co", "group_by": "tag:user", "format": "csv"}
    )
    assert csv_text.splitlines()[0] == "tag:user,requests,input_tokens,output_tokens,cost_usd,cached_input_tokens"

    invoice = admin.call("GET", "/admin/v1/invoices/tag-co", params={"group_by": "tag:project"})
    assert nano(invoice["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine)
    assert nano(invoice["total_usd"]) == sum(nano(li["amount_usd"]) for li in invoice["line_items"])
    assert {li["tag"]["value"] for li in invoice["line_items"]} == projects
    beta = admin.call("GET", "/admin/v1/invoices/tag-co", params={"tag": "project:beta"})
    assert nano(beta["total_usd"]) == sum(nano(r["cost_usd"]) for r in mine if r["tags"].get("project") == "beta")
    admin.call("GET", "/admin/v1/invoices/tag-co", 400, params={"group_by": "model"})
    admin.call("GET", "/admin/v1/usage", 400, params={"tag": "nocolon"})

    # Key defaults change through the admin API (and the CLI), seen by the next request.
    patched = admin.call("PATCH", f"/admin/v1/keys/{key_b['id']}", json={"tags": {"team": "web"}})
    assert patched["tags"] == {"team": "web"}
    admin.call("PATCH", f"/admin/v1/keys/{key_b['id']}", 400, json={"tags": {"k": "v" * 513}})
    rid, _, _ = chat(b, "After patch", max_tokens=2, user="u-9")
    assert admin.wait_for([rid])[rid]["tags"] == {"team": "web", "user": "u-9"}
    db = ["--database", billing.db]
    tagged = json.loads(tollgate("keys", "tag", key_b["id"], "--tag", "team=data", "--tag", "cost=centre=7", *db).stdout)
    assert tagged["tags"] == {"team": "data", "cost": "centre=7"}
    made = json.loads(tollgate("keys", "create", "tag-co", "--name", "cli", "--tag", "project=gamma", *db).stdout)
    assert made["tags"] == {"project": "gamma"}

    # Exports carry the tags and filter on one.
    out = tollgate("usage", "export", "--format", "jsonl", "--tag", "project:alpha", *db).stdout
    exported = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in exported) == sorted(
        rid for rid, t in expected.items() if t.get("project") == "alpha"
    )
    report = json.loads(
        tollgate("usage", "report", "--customer-id", "tag-co", "--group-by", "tag:project", *db).stdout
    )
    assert {row["tag:project"] for row in report["data"]} == projects
    inv = json.loads(tollgate("usage", "invoice", "tag-co", "--tag", "project:beta", *db).stdout)
    assert inv["total_usd"] == beta["total_usd"]


# ---- exports billing systems ingest ----------------------------------------------------------

CLOUDEVENT_NAME = __import__("re").compile(r"^[a-z0-9]{1,20}$")


def check_cloudevent(e):
    """The CloudEvents 1.0 JSON format's rules (spec.md, json-format.md): required context
    attributes, their types, attribute names, and JSON data for application/json."""
    from datetime import datetime
    from urllib.parse import urlparse

    for attr in ("specversion", "id", "source", "type"):
        assert isinstance(e.get(attr), str) and e[attr], f"required attribute {attr}: {e}"
    assert e["specversion"] == "1.0"
    urlparse(e["source"])  # a URI-reference
    assert all(CLOUDEVENT_NAME.match(k) for k in e if k != "data"), sorted(e)
    assert isinstance(e["subject"], str) and e["subject"]
    datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
    assert e["datacontenttype"] == "application/json" and isinstance(e["data"], dict)


def check_stripe_event(e, customer_key="stripe_customer_id"):
    """Stripe's `POST /v1/billing/meter_events` body: event_name (<= 100), identifier
    (<= 5000, unique), timestamp (Unix seconds, within the past 35 days), payload of strings
    holding the customer mapping key."""
    assert set(e) == {"event_name", "identifier", "timestamp", "payload"}, e
    assert 0 < len(e["event_name"]) <= 100 and 0 < len(e["identifier"]) <= 5000
    assert isinstance(e["timestamp"], int) and time.time() - 35 * 86400 < e["timestamp"] <= time.time() + 300
    assert all(isinstance(v, str) for v in e["payload"].values()), e["payload"]
    assert e["payload"][customer_key]
    for kind in ("input_tokens", "cached_input_tokens", "output_tokens"):
        assert e["payload"][kind].isdigit()


def test_exports_as_cloudevents_and_stripe_meter_events(billing):
    admin = Admin(billing)
    admin.customer("exp-co")
    client = sdk(billing, admin.key("exp-co")["key"])
    db = ["--database", billing.db]
    cursor = Path(tempfile.mkdtemp()) / "cursor"
    first = [chat(client, f"Export {i}", max_tokens=3, metadata={"project": "x"})[0] for i in range(2)]
    admin.wait_for(first)
    out1 = tollgate("usage", "export", "--format", "cloudevents", "--cursor-file", str(cursor), *db).stdout
    second = [chat(client, f"Export again {i}", max_tokens=3)[0] for i in range(2)]
    records = admin.wait_for(second + first)
    out2 = tollgate("usage", "export", "--format", "cloudevents", "--cursor-file", str(cursor), *db).stdout
    events1 = [json.loads(line) for line in out1.splitlines()]
    events2 = [json.loads(line) for line in out2.splitlines()]
    assert set(first) <= {e["id"] for e in events1}
    assert {e["id"] for e in events2} == set(second), "incremental: only the new records"
    for e in events1 + events2:
        check_cloudevent(e)
    for rid in first + second:
        e = next(e for e in events1 + events2 if e["id"] == rid)
        r = records[rid]
        assert e["subject"] == "exp-co"
        assert (e["data"]["input_tokens"], e["data"]["output_tokens"]) == (r["input_tokens"], r["output_tokens"])
        assert e["data"]["cost_usd"] == r["cost_usd"] and e["data"]["tags"] == r["tags"]

    # Stripe: Tollgate customers mapped to Stripe's; an unmapped customer stops the export.
    mapping = Path(tempfile.mkdtemp()) / "customers.json"
    mapping.write_text(json.dumps({"exp-co": "cus_EXP"}))
    out = tollgate(
        "usage", "export", "--format", "stripe", "--tag", "project:x", "--stripe-customer-map", str(mapping), *db
    ).stdout
    stripe = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["identifier"] for e in stripe) == sorted(first)
    for e in stripe:
        check_stripe_event(e)
        r = records[e["identifier"]]
        assert e["event_name"] == "tollgate_usage" and e["payload"]["stripe_customer_id"] == "cus_EXP"
        assert int(e["payload"]["output_tokens"]) == r["output_tokens"]
        assert int(e["payload"]["input_tokens"]) + int(e["payload"]["cached_input_tokens"]) == r["input_tokens"]
    admin.customer("exp-unmapped")
    admin.wait_for([chat(sdk(billing, admin.key("exp-unmapped")["key"]), "Unmapped", max_tokens=2)[0]])
    stripe_cursor = Path(tempfile.mkdtemp()) / "cursor"
    failed = subprocess.run(
        [os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate")), "usage", "export",
         "--format", "stripe", "--stripe-customer-map", str(mapping), "--cursor-file", str(stripe_cursor), *db],
        capture_output=True, text=True,
    )
    assert failed.returncode != 0 and "has no Stripe customer" in failed.stderr
    assert not stripe_cursor.exists(), "a failed export does not advance its cursor"
