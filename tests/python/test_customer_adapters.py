"""A customer's own LoRA adapter (issue 34, item 3), on `tollgate serve` with the dev model:
registered through the admin API (its files read and checked against the model: a PEFT
adapter shaped for another model is a 400 naming the problem, an `s3://` URL or a Hugging
Face repo a 400 saying only local paths are supported), it is the model id
`smollm2:pirate` for that customer's keys only: they list it and get its own answer; another
customer's key gets 404 `model_not_found` as for an unknown id. The record names the base
model and the adapter, at the base model's prices unless it has a price of its own (then at
that, the invoice's lines naming base model and adapter; a PATCH or `tollgate customers
adapters update` reprices requests admitted after it only). A restart keeps it (the ledger database
holds it); the CLI lists, removes and adds adapters against the same database, and the
running server follows within seconds. On SQLite, and on PostgreSQL (the replicas' shared
ledger) with TOLLGATE_TEST_POSTGRES=1."""

import os
import shutil
import subprocess
import time
from decimal import Decimal

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, customer_keys, ledger_args, start_server, stop_server, write_config
from lora_common import GGUF, ask, record, shape, write_adapter

ADMIN = "adm-customer-adapters"
CATALOGUE = (
    '[models."smollm2"]\n'
    f'source = {{ path = "{GGUF}" }}\n'
    f'backend = {{ type = "local", kv_cache_bytes = {64 << 20} }}\n'
    'price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }\n')


def admin(srv, method, path, body=None):
    r = httpx.request(method, f"http://{srv.addr}/admin/v1{path}", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    return r.status_code, r.json()


def model_ids(client) -> list:
    return sorted(m.id for m in client.models.list().data)


def cli(*args) -> subprocess.CompletedProcess:
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    return subprocess.run([binary, "customers", "adapters", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture(params=["sqlite", "postgres"])
def setup(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("customer-adapters")
    s = shape()
    write_adapter(tmp / "pirate", s, 8, zero_b=False, seed=7)
    # Shaped for a model twice as wide: every lora_A has the wrong number of columns.
    write_adapter(tmp / "wide", dict(s, hidden=2 * s["hidden"]), 4, zero_b=False, seed=8)
    config = write_config("tollgate-customer-adapters-", CATALOGUE)
    ledger = ledger_args(request.param, "tollgate-customer-adapters-") or [
        "--database", str(tmp / "ledger.db")]
    database = ledger[:2]
    return tmp, config, ["--config", config] + ledger, database


def serve(args):
    return start_server(extra_env={"TOLLGATE_ADMIN_TOKEN": ADMIN}, extra_args=args)


def client_of(srv, key) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=300)


def test_a_customers_adapter_is_its_own_and_survives_a_restart(setup):
    tmp, config, args, database = setup
    srv = serve(args)
    try:
        keys = customer_keys(srv, ADMIN, ["acme", "other"])
        acme, other = client_of(srv, keys["acme"]), client_of(srv, keys["other"])
        base_answer = ask(acme, "smollm2")[0]

        # Refused, with the reason: another model's shapes, remote sources.
        status, error = admin(srv, "POST", "/customers/acme/adapters",
                              {"base_model": "smollm2", "name": "wide", "path": str(tmp / "wide")})
        assert status == 400, error
        assert error["error"]["param"] == "path", error
        assert "cannot be loaded" in error["error"]["message"], error
        for remote in ["s3://adapters/pirate", "HuggingFaceTB/some-lora"]:
            status, error = admin(srv, "POST", "/customers/acme/adapters",
                                  {"base_model": "smollm2", "name": "r", "path": remote})
            assert status == 400, error
            assert "only local paths are supported" in error["error"]["message"], error

        status, added = admin(srv, "POST", "/customers/acme/adapters",
                              {"base_model": "smollm2", "name": "pirate", "path": str(tmp / "pirate")})
        assert status == 201, added
        assert added["id"] == "smollm2:pirate"

        assert model_ids(acme) == ["smollm2", "smollm2:pirate"]
        assert model_ids(other) == ["smollm2"]
        pirate, pirate_id = ask(acme, "smollm2:pirate")
        assert pirate != base_answer, "the adapter changed nothing"
        with pytest.raises(openai.NotFoundError) as refused:
            ask(other, "smollm2:pirate")
        assert refused.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve("smollm2:pirate")

        rec = record(srv, pirate_id, ADMIN)
        assert (rec["model"], rec["base_model"], rec["adapter"]) == ("smollm2:pirate", "smollm2", "pirate"), rec
        prices = (Decimal(str(rec["input_price_per_mtok"])), Decimal(str(rec["output_price_per_mtok"])))
        assert prices == (Decimal("0.05"), Decimal("0.10")), rec
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])

    # The ledger database keeps it: after a restart the owner gets the same answer.
    srv = serve(args)
    try:
        acme, other = client_of(srv, keys["acme"]), client_of(srv, keys["other"])
        assert model_ids(acme) == ["smollm2", "smollm2:pirate"]
        assert ask(acme, "smollm2:pirate")[0] == pirate
        with pytest.raises(openai.NotFoundError):
            ask(other, "smollm2:pirate")

        # The CLI, on the same database: listed, removed, added again (checked first).
        listed = cli("list", "acme", *database)
        assert listed.returncode == 0, listed.stderr
        assert '"smollm2:pirate"' in listed.stdout
        removed = cli("remove", "acme", "pirate", *database)
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: model_ids(acme) == ["smollm2"])
        with pytest.raises(openai.NotFoundError):
            ask(acme, "smollm2:pirate")
        wide = cli("add", "acme", "--base-model", "smollm2", "--name", "wide",
                   "--path", str(tmp / "wide"), "--config", config, *database)
        assert wide.returncode != 0 and "cannot be loaded" in wide.stderr, wide.stderr
        again = cli("add", "acme", "--base-model", "smollm2", "--name", "pirate",
                    "--path", str(tmp / "pirate"), "--config", config, *database)
        assert again.returncode == 0, again.stderr
        wait_until(lambda: model_ids(acme) == ["smollm2", "smollm2:pirate"])
        assert ask(acme, "smollm2:pirate")[0] == pirate

        # Removed through the admin API: gone at once.
        status, _ = admin(srv, "DELETE", "/customers/acme/adapters/pirate")
        assert status == 200
        with pytest.raises(openai.NotFoundError):
            ask(acme, "smollm2:pirate")

        # Other files in the same directory are read anew, not the copy the engine holds:
        # another model's shapes there are refused.
        shutil.rmtree(tmp / "pirate")
        shutil.copytree(tmp / "wide", tmp / "pirate")
        status, error = admin(srv, "POST", "/customers/acme/adapters",
                              {"base_model": "smollm2", "name": "pirate", "path": str(tmp / "pirate")})
        assert status == 400, error
        assert "cannot be loaded" in error["error"]["message"], error
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])


def wait_until(condition, timeout=30):
    """Running servers read the customers' adapters again every few seconds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "the server never followed the database"
        time.sleep(0.5)


def cost(rec) -> Decimal:
    return Decimal(str(rec["cost_usd"]))


def expected_cost(rec, input_price: str, output_price: str) -> Decimal:
    """The record's tokens at the unit prices (USD per million tokens)."""
    usd = (rec["input_tokens"] * Decimal(input_price) + rec["output_tokens"] * Decimal(output_price)) / 10**6
    return usd.quantize(Decimal("0.000000001"))


def test_a_customers_adapter_is_billed_at_its_own_price(setup):
    """Registered with a price of its own, the adapter's requests are billed at it (the record's
    prices and cost, and the invoice's line naming the base model and the adapter); a PATCH
    changes the price for requests admitted after it only; the CLI adds and reprices too."""
    tmp, config, args, database = setup
    srv = serve(args)
    try:
        keys = customer_keys(srv, ADMIN, ["acme"])
        acme = client_of(srv, keys["acme"])
        status, error = admin(srv, "POST", "/customers/acme/adapters",
                              {"base_model": "smollm2", "name": "pirate", "path": str(tmp / "pirate"),
                               "price": {"input_per_mtok": "abc", "output_per_mtok": "1"}})
        assert (status, error["error"]["param"]) == (400, "price.input_per_mtok"), error
        own = {"input_per_mtok": "2.5", "output_per_mtok": "7"}
        status, added = admin(srv, "POST", "/customers/acme/adapters",
                              {"base_model": "smollm2", "name": "pirate", "path": str(tmp / "pirate"),
                               "price": own})
        assert (status, added["price"]) == (201, own), added

        first = record(srv, ask(acme, "smollm2:pirate")[1], ADMIN)
        assert (str(first["input_price_per_mtok"]), str(first["output_price_per_mtok"])) == ("2.5", "7"), first
        assert cost(first) == expected_cost(first, "2.5", "7") > 0, first

        status, patched = admin(srv, "PATCH", "/customers/acme/adapters/pirate",
                                {"price": {"input_per_mtok": "0.5", "output_per_mtok": "1"}})
        assert status == 200 and patched["price"]["output_per_mtok"] == "1", patched
        second = record(srv, ask(acme, "smollm2:pirate")[1], ADMIN)
        assert cost(second) == expected_cost(second, "0.5", "1"), second
        # The record admitted before the change keeps its price.
        assert cost(record(srv, first["id"], ADMIN)) == cost(first)
        base = record(srv, ask(acme, "smollm2")[1], ADMIN)
        assert cost(base) == expected_cost(base, "0.05", "0.10"), base

        invoice = httpx.get(f"http://{srv.addr}/admin/v1/invoices/acme",
                            headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60).json()
        # Prompt tokens served from the prefix cache have lines of their own (at the same
        # prices here: the cached price is the input price unless set).
        tokens = {(l["model"], l["input_price_per_mtok"]) for l in invoice["line_items"] if l["kind"] == "tokens"}
        assert tokens == {("smollm2:pirate", "2.5"), ("smollm2:pirate", "0.5"), ("smollm2", "0.05")}, invoice
        for line in invoice["line_items"]:
            adapter = line["model"] == "smollm2:pirate"
            assert (line["base_model"], line["adapter"]) == (("smollm2", "pirate") if adapter else (None, None))
        pirate = sum(Decimal(l["amount_usd"]) for l in invoice["line_items"] if l["model"] == "smollm2:pirate")
        assert pirate == cost(first) + cost(second), invoice
        assert Decimal(invoice["total_usd"]) == cost(first) + cost(second) + cost(base)

        # The CLI: reprice, then an adapter added with its own price; the server follows.
        updated = cli("update", "acme", "pirate", "--price-input-per-mtok", "4",
                      "--price-output-per-mtok", "8", "--config", config, *database)
        assert updated.returncode == 0, updated.stderr
        bad = cli("update", "acme", "pirate", "--price-input-per-mtok=-4",
                  "--price-output-per-mtok", "8", "--config", config, *database)
        assert bad.returncode != 0 and "price.input_per_mtok" in bad.stderr, bad.stderr
        assert admin(srv, "GET", "/customers/acme/adapters")[1]["data"][0]["price"] == {
            "input_per_mtok": "4", "output_per_mtok": "8"}
        # The server reads the ledger's adapters again within seconds: until then a request is
        # billed at the price it had, each record at the prices it names.
        deadline = time.time() + 30
        while True:
            third = record(srv, ask(acme, "smollm2:pirate")[1], ADMIN)
            prices = (str(third["input_price_per_mtok"]), str(third["output_price_per_mtok"]))
            assert prices in {("0.5", "1"), ("4", "8")}, third
            assert cost(third) == expected_cost(third, *prices), third
            if prices == ("4", "8"):
                break
            assert time.time() < deadline, "the server never followed the CLI's price"
            time.sleep(0.5)
        invoice_csv = cli_usage("invoice", "acme", "--format", "csv", *database)
        assert invoice_csv.returncode == 0, invoice_csv.stderr
        rows = invoice_csv.stdout.splitlines()
        assert rows[0].endswith(",amount_usd,base_model,adapter"), rows
        assert any(",smollm2:pirate," in r and r.endswith(",smollm2,pirate") for r in rows[1:]), rows
        assert any(r.startswith("tokens,smollm2,") and r.endswith(",,") for r in rows[1:]), rows
    finally:
        assert stop_server(srv) == 0, "".join(srv.log[-40:])


def cli_usage(*args) -> subprocess.CompletedProcess:
    binary = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))
    return subprocess.run([binary, "usage", *args], cwd=ROOT, text=True, capture_output=True, timeout=300)
