"""The audit log against the real server: changes made through the admin API and through the
CLI are recorded with their actor, address and what changed; `GET /admin/v1/audit` pages
through them with its cursor; and no issued secret (nor the admin token) appears in the audit
table, anywhere in the database file, or in the server's log."""

import json
import os
import sqlite3
import subprocess
import tempfile

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, start_server, stop_server

ADMIN = "admin-audit-token-3f9c2a"
MODEL = "smollm2-135m"


def tollgate(*args, env=None):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, check=True, env=dict(os.environ, **(env or {}))
    )


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="tollgate-audit-")
    db = os.path.join(tmp, "ledger.db")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN, "RUST_LOG": "debug,sqlx=info,hyper=info,h2=info"}, ["--database", db])
    srv.db = db
    yield srv
    assert stop_server(srv) == 0


def test_admin_api_and_cli_changes_are_audited_without_secrets(server):
    http = httpx.Client(base_url=f"http://{server.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    secrets = []

    r = http.post("/admin/v1/customers", json={"id": "aud-co", "name": "Audit Co", "rpm": 60})
    assert r.status_code == 201, r.text
    r = http.patch("/admin/v1/customers/aud-co", json={"budget_usd": "12.5", "rpm": 120})
    assert r.status_code == 200, r.text
    r = http.post("/admin/v1/customers/aud-co/keys", json={"name": "prod", "tpm": 100000})
    assert r.status_code == 201, r.text
    api_key = r.json()
    secrets.append(api_key["key"])
    # The key works, then is revoked (twice: the second changes nothing and is not audited).
    client = OpenAI(base_url=server.base_url, api_key=api_key["key"], max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert http.delete(f"/admin/v1/keys/{api_key['id']}").status_code == 200
    assert http.delete(f"/admin/v1/keys/{api_key['id']}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)

    # The CLI, as an OS user, against the same database.
    db = ["--database", server.db]
    as_user = {"USER": "auditor", "LOGNAME": "auditor"}
    tollgate("customers", "create", "cli-co", "--budget-usd", "3", *db, env=as_user)
    cli_key = json.loads(tollgate("keys", "create", "cli-co", "--name", "cron", *db, env=as_user).stdout)
    secrets.append(cli_key["key"])
    tollgate("keys", "budget", cli_key["id"], "--budget-usd", "1", *db, env=as_user)

    # One page, and the same entries page by page through the cursor.
    everything = http.get("/admin/v1/audit", params={"limit": 1000}).json()["data"]
    paged, cursor = [], None
    while True:
        params = {"limit": 2} | ({"after": cursor} if cursor else {})
        page = http.get("/admin/v1/audit", params=params).json()
        paged += page["data"]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert [e["id"] for e in paged] == [e["id"] for e in everything]
    ours = [e for e in everything if e["target"]["id"] != "default"]
    seen = [(e["action"], e["target"]["id"], e["actor"]["type"]) for e in ours]
    assert seen == [
        ("customer.created", "aud-co", "admin_api"),
        ("customer.updated", "aud-co", "admin_api"),
        ("key.created", api_key["id"], "admin_api"),
        ("key.revoked", api_key["id"], "admin_api"),
        ("customer.created", "cli-co", "cli"),
        ("key.created", cli_key["id"], "cli"),
        ("key.updated", cli_key["id"], "cli"),
    ], seen
    api, cli = ours[:4], ours[4:]
    for e in api:
        assert e["remote_addr"].startswith("127.0.0.1:"), e
        assert e["actor"]["name"] == "admin token bootstrap"
        assert len(e["request_id"]) == 36
    for e in cli:
        assert e["actor"]["name"] == "cli user auditor" and e["remote_addr"] is None, e
    assert ours[1]["changes"] == {
        "budget_usd": {"from": None, "to": "12.500000000"},
        "rpm": {"from": 60, "to": 120},
    }
    assert ours[2]["changes"]["tpm"] == 100000 and ours[2]["changes"]["name"] == "prod"
    assert ours[6]["changes"] == {"budget_usd": {"from": None, "to": "1.000000000"}}

    # The secrets are nowhere: not in the audit table, not in the database file (only their
    # digests are stored), not in the log. Nor is the admin token.
    with sqlite3.connect(server.db) as conn:
        table = json.dumps(conn.execute("SELECT * FROM audit_log").fetchall())
    assert len(table) > 500
    files = b"".join(
        open(p, "rb").read() for p in (server.db, server.db + "-wal") if os.path.exists(p)
    )
    log = "".join(server.log)
    assert api_key["id"] in log or "aud-co" in log, "the log is being read"
    for secret in secrets + [ADMIN]:
        assert secret not in table
        assert secret.encode() not in files
        assert secret not in log
        assert secret not in json.dumps(everything)


def test_webhook_and_admin_token_changes_are_audited_without_secrets(server):
    http = httpx.Client(base_url=f"http://{server.addr}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert http.post("/admin/v1/customers", json={"id": "hook-co"}).status_code == 201
    r = http.put("/admin/v1/customers/hook-co/alerts",
                 json={"webhook_url": "http://127.0.0.1:9/hook", "thresholds": ["0.5", "0.9"]})
    assert r.status_code == 200, r.text
    webhook_secret = r.json()["webhook_secret"]
    r = http.put("/admin/v1/customers/hook-co/alerts", json={"thresholds": ["0.8"]})
    assert r.status_code == 200 and "webhook_secret" not in r.json(), r.text
    r = http.post("/admin/v1/admin_tokens", json={"name": "billing-export", "scopes": ["usage:read"]})
    assert r.status_code == 201, r.text
    token = r.json()
    assert http.delete(f"/admin/v1/admin_tokens/{token['id']}").status_code == 200

    entries = http.get("/admin/v1/audit", params={"limit": 1000}).json()["data"]
    mine = [e for e in entries if e["target"]["id"] in ("hook-co", token["id"])]
    assert [(e["action"], e["target"]["type"]) for e in mine] == [
        ("customer.created", "customer"),
        ("alert_settings.updated", "customer"),
        ("alert_settings.updated", "customer"),
        ("admin_token.created", "admin_token"),
        ("admin_token.revoked", "admin_token"),
    ], mine
    assert mine[1]["changes"] == {
        "webhook_url": {"from": None, "to": "http://127.0.0.1:9/hook"},
        "thresholds": {"from": ["0.5", "0.8", "1.0"], "to": ["0.5", "0.9"]},
        "webhook_secret_issued": True,
    }, mine[1]
    assert mine[2]["changes"] == {"thresholds": {"from": ["0.5", "0.9"], "to": ["0.8"]}}, mine[2]
    assert mine[3]["changes"] == {"name": "billing-export", "scopes": ["usage:read"]}, mine[3]
    assert all(e["actor"]["name"] == "admin token bootstrap" for e in mine)
    with sqlite3.connect(server.db) as conn:
        table = json.dumps(conn.execute("SELECT * FROM audit_log").fetchall())
    for secret in (webhook_secret, token["token"]):
        assert secret not in table
        assert secret not in "".join(server.log)
        assert secret not in json.dumps(entries)


def test_audit_requires_the_admin_token_and_checks_its_parameters(server):
    base = f"http://{server.addr}/admin/v1/audit"
    assert httpx.get(base).status_code == 401
    assert httpx.get(base, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad = httpx.get(base, params={"limit": 0}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    bad = httpx.get(base, params={"after": "x"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
