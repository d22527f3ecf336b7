"""Scoped admin credentials against the real server: tokens issued through the admin API and
the CLI, stored hashed; a billing export job's `usage:read` token reads usage, records and
invoices and is refused (403 `insufficient_scope`) everything else; `keys:write` manages keys
only; the bootstrap TOLLGATE_ADMIN_TOKEN is `admin`; a revoked token is refused at once; and
failed admin authentication is limited per client address (429 with Retry-After) without
locking out other addresses."""

import json
import os
import socket
import sqlite3
import subprocess
import tempfile

import httpx
import pytest

from conftest import ROOT, start_server, stop_server

ADMIN = "scopes-bootstrap"


@pytest.fixture(scope="module")
def srv():
    tmp = tempfile.mkdtemp(prefix="tollgate-scopes-")
    db = os.path.join(tmp, "ledger.db")
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", db])
    s.db = db
    s.boot = client(s, ADMIN)
    yield s
    assert stop_server(s) == 0


def post_raw(addr, path, token, body):
    """POSTs `body` over a plain socket, writing all of it before reading the answer (as a
    client that streams its upload does); returns (status, body text). A reset while writing or
    reading is a failure of the server, not of this client."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        s.sendall(head + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest.decode(errors="replace")


def client(srv, token, local_address=None):
    transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
    return httpx.Client(base_url=f"http://{srv.addr}", headers={"Authorization": f"Bearer {token}"},
                        timeout=60, transport=transport)


def cli(srv, *args):
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    out = subprocess.run([binary, *args, "--database", srv.db], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout)


def refused_scope(r, scope):
    assert r.status_code == 403, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert err["code"] == "insufficient_scope" and scope in err["message"], err


def test_usage_read_token_reads_usage_and_nothing_else(srv):
    assert srv.boot.post("/admin/v1/customers", json={"id": "billed"}).status_code == 201
    key = srv.boot.post("/admin/v1/customers/billed/keys", json={"name": "k"}).json()
    r = srv.boot.post("/admin/v1/admin_tokens", json={"name": "billing-export", "scopes": ["usage:read"]})
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["scopes"] == ["usage:read"] and issued["token"].startswith("tga-")
    job = client(srv, issued["token"])
    for path in ("/admin/v1/usage", "/admin/v1/usage?format=csv", "/admin/v1/usage/records",
                 "/admin/v1/invoices/billed"):
        r = job.get(path)
        assert r.status_code == 200, f"{path}: {r.text}"
    refused_scope(job.get("/admin/v1/customers"), "customers:write")
    refused_scope(job.get("/admin/v1/customers/billed"), "customers:write")
    refused_scope(job.post("/admin/v1/customers", json={"id": "nope"}), "customers:write")
    refused_scope(job.patch("/admin/v1/customers/billed", json={"rpm": 1}), "customers:write")
    refused_scope(job.post("/admin/v1/customers/billed/keys", json={"name": "x"}), "keys:write")
    refused_scope(job.delete(f"/admin/v1/keys/{key['id']}"), "keys:write")
    refused_scope(job.get("/admin/v1/admin_tokens"), "admin")
    refused_scope(job.post("/admin/v1/admin_tokens", json={"scopes": ["admin"]}), "admin")
    # Nothing was changed by the refused calls.
    assert srv.boot.get("/admin/v1/customers/billed").json()["rpm"] is None
    assert srv.boot.get("/admin/v1/customers/billed/keys").json()["data"][0]["revoked_at"] is None
    assert srv.boot.get("/admin/v1/customers/nope").status_code == 404


def test_cli_issued_keys_write_token_and_revocation(srv):
    issued = cli(srv, "admin-tokens", "create", "--scopes", "keys:write", "--name", "key-bot")
    bot = client(srv, issued["token"])
    assert srv.boot.post("/admin/v1/customers", json={"id": "bot-cust"}).status_code == 201
    k = bot.post("/admin/v1/customers/bot-cust/keys", json={"name": "by-bot"})
    assert k.status_code == 201, k.text
    assert bot.get("/admin/v1/customers/bot-cust/keys").status_code == 200
    refused_scope(bot.get("/admin/v1/usage"), "usage:read")
    refused_scope(bot.post("/admin/v1/customers", json={"id": "x"}), "customers:write")
    # Revoked through the CLI: refused at once.
    revoked = cli(srv, "admin-tokens", "revoke", issued["id"])
    assert revoked["revoked_at"] is not None
    r = bot.get("/admin/v1/customers/bot-cust/keys")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token", r.text


def test_tokens_are_stored_hashed_and_listed_without_secrets(srv):
    issued = srv.boot.post("/admin/v1/admin_tokens", json={"scopes": ["customers:write", "usage:read"]}).json()
    assert issued["scopes"] == ["usage:read", "customers:write"]
    listed = srv.boot.get("/admin/v1/admin_tokens").json()["data"]
    assert any(t["id"] == issued["id"] for t in listed)
    assert issued["token"] not in str(listed) and all("token" not in t for t in listed)
    with sqlite3.connect(srv.db) as conn:
        rows = conn.execute("SELECT token_hash, scopes FROM admin_tokens WHERE id = ?", (issued["id"],)).fetchall()
    assert len(rows) == 1 and rows[0][0] != issued["token"] and len(rows[0][0]) == 64
    with open(srv.db, "rb") as f:
        assert issued["token"].encode() not in f.read()
    # customers:write manages customers but not keys.
    both = client(srv, issued["token"])
    assert both.post("/admin/v1/customers", json={"id": "by-token"}).status_code == 201
    refused_scope(both.post("/admin/v1/customers/by-token/keys", json={"name": "k"}), "keys:write")


def test_bad_scopes_are_refused(srv):
    for body in ({"scopes": []}, {"scopes": ["usage:write"]}, {}, {"scopes": ["admin"], "extra": 1}):
        r = srv.boot.post("/admin/v1/admin_tokens", json=body)
        assert r.status_code == 400, r.text


def test_failed_admin_authentication_is_limited_per_address(srv):
    attacker = client(srv, "guess", local_address="127.0.0.2")
    codes = [attacker.get("/admin/v1/customers").status_code for _ in range(10)]
    assert codes == [401] * 10
    r = attacker.get("/admin/v1/customers")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # From that address even the right token waits out the window ...
    right_but_blocked = client(srv, ADMIN, local_address="127.0.0.2")
    assert right_but_blocked.get("/admin/v1/customers").status_code == 429
    # ... while other addresses are not affected.
    assert srv.boot.get("/admin/v1/customers").status_code == 200
    assert client(srv, ADMIN, local_address="127.0.0.3").get("/admin/v1/customers").status_code == 200


def test_admin_extractor_rejections_are_openai_shaped(srv):
    """What axum's extractors refuse before a handler runs (a path segment that is not UTF-8, a
    body past the limit) comes back as an OpenAI-shaped error, never plain text; a value quoted
    back in an error is cut short."""
    boot = srv.boot
    for method, path, param in [
        ("GET", "/admin/v1/customers/%FF", "id"),
        ("PATCH", "/admin/v1/customers/%FF", "id"),
        ("GET", "/admin/v1/customers/%FF/keys", "id"),
        ("DELETE", "/admin/v1/keys/%FF", "key_id"),
        ("GET", "/admin/v1/invoices/%FF", "customer_id"),
        ("GET", "/admin/v1/customers/%FF/alerts", "id"),
        ("DELETE", "/admin/v1/admin_tokens/%FF", "id"),
    ]:
        r = boot.request(method, path, json={} if method == "PATCH" else None)
        assert r.status_code == 400, f"{method} {path}: {r.status_code} {r.text}"
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (path, err)
    key = boot.post("/admin/v1/customers/default/keys", json={"name": "ext"}).json()["key"]
    r = httpx.get(f"http://{srv.addr}/v1/models/%FF", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    # A body far past the 4 MiB limit, written whole before the answer is read: the client gets
    # the 413, not a connection reset (the server reads what it refuses; an answer sent while
    # the client still writes is lost in the reset, however fast either side is).
    status, body = post_raw(srv.addr, "/admin/v1/customers", ADMIN, b'{"id": "' + b"a" * (32 << 20) + b'"}')
    assert status == 413, (status, body[:300])
    assert json.loads(body)["error"]["type"] == "invalid_request_error", body[:300]
    r = boot.post("/admin/v1/customers", json={"id": "b" * 100_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "id"
    assert len(r.text) < 1_000, len(r.text)
