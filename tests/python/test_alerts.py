"""Budget alerts against the real server and model, with a real HTTP receiver: thresholds of
the monthly budget fire once each, as signed JSON events, retried until the receiver answers
2xx, and delivered from the database's outbox even when the gateway is killed between the spend
and the delivery."""

import hashlib
import hmac
import json
import os
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from openai import OpenAI

from conftest import ROOT, free_port, start_server, stop_server

ADMIN = "alerts-admin"
MODEL = "smollm2-135m"



class Receiver:
    """A webhook receiver on `port` that answers 500 to the first `fail_first` deliveries of
    each event, then 204; it keeps every delivery it got."""

    def __init__(self, port=None, fail_first=0):
        self.port = port or free_port()
        self.fail_first = fail_first
        self.deliveries = []  # (headers, body, answered status)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                event_id = json.loads(body)["id"]
                with outer.lock:
                    earlier = sum(1 for _, b, _ in outer.deliveries if json.loads(b)["id"] == event_id)
                    status = 500 if earlier < outer.fail_first else 204
                    outer.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/hooks/budget"

    def accepted(self):
        with self.lock:
            return [(h, b) for h, b, s in self.deliveries if s == 204]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def admin(srv, method, path, body=None, expect=200, params=None):
    r = httpx.request(method, f"http://{srv.addr}/admin/v1{path}", json=body, params=params,
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == expect, r.text
    return r.json()


def check_signature(headers, body, secret):
    parts = dict(p.split("=", 1) for p in headers["tollgate-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.{body}".encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected), "signature does not verify"
    assert abs(int(parts["t"]) - time.time()) < 300
    assert headers["tollgate-event-id"] == json.loads(body)["id"]


def spend_until(srv, key, customer, fraction, budget_nano):
    """Chat requests until the customer's spend this month reaches `fraction` of its budget."""
    client = OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)
    for i in range(200):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to three. ({i})"}],
            max_tokens=8, temperature=0,
        )
        time.sleep(0.15)  # the ledger writes in batches
        spent = admin(srv, "GET", f"/customers/{customer}")["spent_usd_this_period"]
        whole, _, frac = spent.partition(".")
        if int(whole) * 10**9 + int((frac + "0" * 9)[:9]) >= fraction * budget_nano:
            return
    raise AssertionError("the spend never reached the threshold")


def wait(predicate, timeout=30, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_thresholds_fire_once_signed_and_retried_until_2xx():
    receiver = Receiver(fail_first=2)
    tmp = tempfile.mkdtemp(prefix="tollgate-alerts-")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", os.path.join(tmp, "ledger.db")])
    try:
        budget = 20_000  # nano-USD: a handful of short requests at 0.05/0.10 USD per Mtok
        admin(srv, "POST", "/customers", {"id": "alert-co", "name": "Alert Co", "budget_usd": "0.00002"}, 201)
        key = admin(srv, "POST", "/customers/alert-co/keys", {"name": "k"}, 201)["key"]
        # Settings: defaults until changed; bad input is a 400 naming the field.
        got = admin(srv, "GET", "/customers/alert-co/alerts")
        assert got["thresholds"] == ["0.5", "0.8", "1.0"] and got["webhook_url"] is None
        for bad, field in [({"thresholds": [0.5, 1.5]}, "thresholds"), ({"webhook_url": "ftp://x"}, "webhook_url"),
                           ({"thresholds": "0.5"}, "thresholds"), ({"colour": 1}, "colour")]:
            err = admin(srv, "PUT", "/customers/alert-co/alerts", bad, expect=400)["error"]
            assert err["param"] == field, (bad, err)
        set_ = admin(srv, "PUT", "/customers/alert-co/alerts", {"webhook_url": receiver.url, "thresholds": [0.8, 0.5]})
        secret = set_["webhook_secret"]
        assert secret.startswith("whsec_") and set_["thresholds"] == ["0.5", "0.8"]
        # The secret is shown once.
        assert "webhook_secret" not in admin(srv, "GET", "/customers/alert-co/alerts")
        assert "webhook_secret" not in admin(srv, "PUT", "/customers/alert-co/alerts", {"thresholds": [0.5, 0.8]})

        spend_until(srv, key, "alert-co", 0.8, budget)
        alerts = wait(lambda: [a for a in admin(srv, "GET", "/alerts", params={"customer_id": "alert-co"})["data"]
                               if a["status"] == "delivered"] if len(receiver.accepted()) >= 2 else None,
                      what="two delivered alerts")
        by_threshold = {a["threshold"]: a for a in alerts}
        assert sorted(by_threshold) == ["0.5", "0.8"]
        for a in alerts:
            assert a["attempts"] == 3, a  # two 500s, then the 204
            assert a["delivered_at"] and a["last_error"] is None
        # Each event was delivered (accepted) once, and every attempt of it was the same body.
        accepted = receiver.accepted()
        assert sorted(json.loads(b)["id"] for _, b in accepted) == sorted(a["id"] for a in alerts)
        for headers, body in accepted:
            check_signature(headers, body, secret)
            event = json.loads(body)
            assert event["type"] == "budget.threshold_crossed"
            data = event["data"]
            assert data["customer_id"] == "alert-co" and data["budget_usd"] == "0.000020000"
            spent = int(data["spent_usd"].replace(".", ""))
            assert spent >= float(data["threshold"]) * budget
            attempts = [b for _, b, _ in receiver.deliveries if json.loads(b)["id"] == event["id"]]
            assert attempts == [body] * 3
        # More spend in the month fires nothing again, even when it crosses a threshold anew: the
        # budget doubled (the spend is now under half of it), then spent past half again. Every
        # request is admitted (no refusal to pass over).
        before = len(receiver.deliveries)
        admin(srv, "PATCH", "/customers/alert-co", {"budget_usd": "0.00004"})
        spend_until(srv, key, "alert-co", 0.5, 2 * budget)
        # The spend read is that of committed records, and the alert step runs in the transaction
        # that commits them: the outbox is current, nothing to wait for.
        assert len(admin(srv, "GET", "/alerts", params={"customer_id": "alert-co"})["data"]) == 2
        assert len(receiver.deliveries) == before
    finally:
        assert stop_server(srv) == 0
        receiver.close()


def test_an_alert_survives_a_gateway_killed_between_the_spend_and_the_delivery():
    tmp = tempfile.mkdtemp(prefix="tollgate-alerts-kill-")
    args = ["--database", os.path.join(tmp, "ledger.db")]
    port = free_port()  # nothing listens there yet: every delivery fails
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    receiver = None
    try:
        admin(srv, "POST", "/customers", {"id": "alert-kill", "name": "K", "budget_usd": "0.00002"}, 201)
        key = admin(srv, "POST", "/customers/alert-kill/keys", {"name": "k"}, 201)["key"]
        # Set through the CLI against the same database: the secret is printed once.
        binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
        out = subprocess.run(
            [binary, "customers", "alerts", "alert-kill", "--webhook-url", f"http://127.0.0.1:{port}/hook",
             "--thresholds", "0.5", "--database", args[1]],
            capture_output=True, text=True, check=True,
        ).stdout
        settings = json.loads(out)
        secret = settings["webhook_secret"]
        assert settings["thresholds"] == ["0.5"]
        spend_until(srv, key, "alert-kill", 0.5, 20_000)
        pending = wait(lambda: [a for a in admin(srv, "GET", "/alerts", params={"customer_id": "alert-kill"})["data"]
                                if a["status"] == "pending" and a["attempts"] >= 1],
                       what="a pending alert whose delivery failed")
        assert len(pending) == 1 and "127.0.0.1" in pending[0]["last_error"]
        srv.proc.kill()  # SIGKILL: the alert is only in the database now
        srv.proc.wait()
        receiver = Receiver(port=port)
        srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
        wait(lambda: receiver.accepted(), timeout=60, what="the delivery after the restart")
        (headers, body), = receiver.accepted()
        check_signature(headers, body, secret)
        assert json.loads(body)["id"] == pending[0]["id"]
        delivered = admin(srv, "GET", "/alerts", params={"customer_id": "alert-kill"})["data"]
        assert [a["status"] for a in delivered] == ["delivered"]
    finally:
        assert stop_server(srv) == 0
        if receiver:
            receiver.close()
