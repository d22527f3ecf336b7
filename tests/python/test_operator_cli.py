"""The operator's command line against a real SQLite ledger (issue 29, items 7 and 8): `usage
export` takes the records API's filters; run from cron as the README says it loses no batch
(`--output-dir` writes a new file per run, named by its cursor range) and an incremental CSV
carries its header once; `keys update` changes a key's limits, models and expiry; `keys get`
and `customers get` show the key's customer and the month's spend. No server and no model: the
records are written into the database directly."""

import json
import os
import sqlite3
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT

BIN = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "release" / "tollgate"))


def tollgate(*args, check=True):
    out = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, f"{args}: {out.stderr}"
    return out


class Ledger:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="tollgate-operator-cli-")
        self.path = os.path.join(self.dir, "ledger.db")
        self.db = ["--database", self.path]
        self.t0 = (int(time.time()) - 60) * 1_000_000

    def add(self, rid, customer, key, model="smollm2-135m", status="completed", at=0):
        started = self.t0 + at * 1_000_000
        with sqlite3.connect(self.path) as conn:
            conn.execute(
                "INSERT INTO usage_records (id, customer_id, key_id, model, endpoint, stream, status, "
                "input_tokens, output_tokens, started_at, finished_at, input_price_per_mtok, "
                "output_price_per_mtok, cost_nano_usd, cached_input_tokens) "
                "VALUES (?, ?, ?, ?, '/v1/chat/completions', 0, ?, 10, 5, ?, ?, '1', '2', 20000, 4)",
                (rid, customer, key, model, status, started, started + 1000),
            )

    def export(self, *args):
        return tollgate("usage", "export", *args, *self.db).stdout


@pytest.fixture
def ledger():
    ledger = Ledger()
    for c in ("a", "b"):
        tollgate("customers", "create", c, *ledger.db)
    return ledger


def ids(jsonl):
    return [json.loads(line)["id"] for line in jsonl.splitlines()]


def test_export_takes_the_records_api_filters(ledger):
    ledger.add("r1", "a", "ka", at=0)
    ledger.add("r2", "b", "kb", status="failed", at=1)
    ledger.add("r3", "a", "ka", model="other", status="cancelled", at=2)
    ledger.add("r4", "a", "ka2", at=3)
    t = lambda s: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((ledger.t0 + s * 1_000_000) / 1e6))
    assert ids(ledger.export("--customer-id", "a")) == ["r1", "r3", "r4"]
    assert ids(ledger.export("--key-id", "ka")) == ["r1", "r3"]
    assert ids(ledger.export("--model", "other")) == ["r3"]
    assert ids(ledger.export("--status", "failed")) == ["r2"]
    assert ids(ledger.export("--customer-id", "a", "--status", "completed")) == ["r1", "r4"]
    # The API's names for the time range work too (`--from`/`--to` as before).
    assert ids(ledger.export("--start", t(1), "--end", t(3))) == ["r2", "r3"]
    assert ids(ledger.export("--from", t(3))) == ["r4"]
    # A filter under a cursor: the next run has exactly the new records of that customer.
    cursor = os.path.join(ledger.dir, "a.cursor")
    assert ids(ledger.export("--customer-id", "a", "--cursor-file", cursor)) == ["r1", "r3", "r4"]
    ledger.add("r5", "b", "kb", at=4)
    ledger.add("r6", "a", "ka", at=5)
    assert ids(ledger.export("--customer-id", "a", "--cursor-file", cursor)) == ["r6"]
    assert ids(ledger.export("--customer-id", "a", "--cursor-file", cursor)) == []
    bad = tollgate("usage", "export", "--status", "done", *ledger.db, check=False)
    assert bad.returncode != 0 and "done" in bad.stderr


def test_cron_export_to_a_directory_keeps_every_batch(ledger):
    outbox = os.path.join(ledger.dir, "outbox")
    cursor = os.path.join(ledger.dir, "export.cursor")
    run = lambda: ledger.export("--format", "cloudevents", "--cursor-file", cursor, "--output-dir", outbox)
    ledger.add("r1", "a", "ka", at=0)
    ledger.add("r2", "b", "kb", at=1)
    run()
    first = sorted(os.listdir(outbox))
    assert len(first) == 1 and first[0].endswith(".jsonl"), first
    # The upload of that batch fails (its file stays); new records arrive; cron runs again.
    ledger.add("r3", "a", "ka", at=2)
    run()
    files = sorted(os.listdir(outbox))
    assert len(files) == 2 and files[0] == first[0], files
    read = lambda name: ids(open(os.path.join(outbox, name)).read())
    assert read(files[0]) == ["r1", "r2"], "the failed batch is still there, whole"
    assert read(files[1]) == ["r3"]
    # Named by the cursor range each covers, so they sort in ledger order and never collide.
    seqs = [tuple(int(n) for n in f.split(".")[0].split("-")[1:]) for f in files]
    assert seqs[0][0] <= seqs[0][1] < seqs[1][0] <= seqs[1][1], seqs
    # A run with nothing new writes nothing and leaves the batches alone.
    run()
    assert sorted(os.listdir(outbox)) == files
    # Delivered files are deleted by the consumer; the next run starts a new one.
    for f in files:
        os.remove(os.path.join(outbox, f))
    ledger.add("r4", "a", "ka", at=3)
    run()
    (last,) = os.listdir(outbox)
    assert read(last) == ["r4"]


def test_incremental_csv_export_carries_its_header_once(ledger):
    cursor = os.path.join(ledger.dir, "csv.cursor")
    out = os.path.join(ledger.dir, "usage.csv")
    ledger.add("r1", "a", "ka", at=0)
    ledger.add("r2", "a", "ka", at=1)
    ledger.export("--format", "csv", "--cursor-file", cursor, "--output", out)
    ledger.export("--format", "csv", "--cursor-file", cursor, "--output", out)  # nothing new
    ledger.add("r3", "b", "kb", at=2)
    ledger.export("--format", "csv", "--cursor-file", cursor, "--output", out)
    lines = open(out).read().splitlines()
    assert lines[0].startswith("id,customer_id,key_id"), lines
    assert [line.split(",")[0] for line in lines[1:]] == ["r1", "r2", "r3"], lines
    # Appended from stdout (`>> usage.csv` in a crontab): the header once too.
    cursor2 = os.path.join(ledger.dir, "stdout.cursor")
    text = ledger.export("--format", "csv", "--cursor-file", cursor2)
    ledger.add("r4", "b", "kb", at=3)
    text += ledger.export("--format", "csv", "--cursor-file", cursor2)
    rows = text.splitlines()
    assert sum(1 for r in rows if r.startswith("id,")) == 1, rows
    assert [r.split(",")[0] for r in rows[1:]] == ["r1", "r2", "r3", "r4"]
    # The cached column is in the record export and in reports.
    assert "cached_input_tokens" in lines[0].split(",")
    report = tollgate("usage", "report", "--group-by", "customer", "--format", "csv",
                      "--from", "2000-01-01", *ledger.db).stdout.splitlines()
    assert report[0].split(",")[-1] == "cached_input_tokens", report
    assert report[1].split(",")[-1] == "8", report  # a: two records of 4 cached tokens


def test_keys_update_and_get_and_customers_get_spend(ledger):
    key = json.loads(tollgate("keys", "create", "a", "--name", "prod", *ledger.db).stdout)
    changed = json.loads(tollgate(
        "keys", "update", key["id"], "--rpm", "5", "--tpm", "1000", "--max-concurrent-requests", "2",
        "--models", "smollm2-135m", "--expires-at", "2999-01-01", *ledger.db,
    ).stdout)
    assert (changed["rpm"], changed["tpm"], changed["max_concurrent_requests"]) == (5, 1000, 2)
    assert changed["models"] == ["smollm2-135m"]
    assert changed["expires_at"].startswith("2999-01-01T00:00:00")
    cleared = json.loads(tollgate("keys", "update", key["id"], "--rpm", "none", "--models", "none",
                                  "--expires-at", "none", *ledger.db).stdout)
    assert cleared["rpm"] is None and cleared["models"] is None and cleared["expires_at"] is None
    assert cleared["tpm"] == 1000
    got = json.loads(tollgate("keys", "get", key["id"], *ledger.db).stdout)
    assert got["customer_id"] == "a" and got["id"] == key["id"] and "key" not in got
    nothing = tollgate("keys", "update", key["id"], *ledger.db, check=False)
    assert nothing.returncode != 0 and "nothing to change" in nothing.stderr
    past = tollgate("keys", "update", key["id"], "--expires-at", "2001-01-01", *ledger.db, check=False)
    assert past.returncode != 0 and "past" in past.stderr

    ledger.add("r1", "a", "ka", at=0)
    ledger.add("r2", "a", "ka", at=1)
    ledger.add("r3", "b", "kb", at=2)
    customer = json.loads(tollgate("customers", "get", "a", *ledger.db).stdout)
    # Two records of 20,000 nano-USD this month (the fixture's records are minutes old).
    assert customer["spent_usd_this_period"] == "0.000040000", customer


def test_reservations_from_the_command_line(ledger):
    """`tollgate reservations`: a model's reservations never pass its capacity_tpm; a model
    without one cannot be reserved; the invoice bills the month's share; the export shows the
    records' tier."""
    config = os.path.join(ledger.dir, "models.toml")
    with open(config, "w") as f:
        f.write(
            '[models.big]\nsource = { path = "x.gguf" }\nbackend = { type = "http", urls = ["http://127.0.0.1:9"] }\n'
            'price = { input_per_mtok = "1", output_per_mtok = "2", reserved_per_ktpm_month = "30" }\n'
            "capacity_tpm = 1000\n"
            '[models.small]\nsource = { path = "x.gguf" }\nbackend = { type = "http", urls = ["http://127.0.0.1:9"] }\n'
        )

    def reserve(model, tpm, *more, check=True):
        return tollgate("reservations", "create", "a", "--model", model, "--tpm", str(tpm),
                        "--starts-at", "2026-11-01", *more, "--config", config, *ledger.db, check=check)

    made = json.loads(reserve("big", 600, "--ends-at", "2026-11-16").stdout)
    assert made["object"] == "reservation" and made["price_per_ktpm_month"] == "30"
    over = reserve("big", 401, check=False)
    assert over.returncode != 0 and "400 of its 1000" in over.stderr, over.stderr
    small = reserve("small", 1, check=False)
    assert small.returncode != 0 and "cannot be reserved" in small.stderr, small.stderr
    listed = json.loads(tollgate("reservations", "list", "--customer-id", "a", *ledger.db).stdout)
    assert [r["id"] for r in listed["data"]] == [made["id"]]

    invoice = json.loads(tollgate("usage", "invoice", "a", "--period", "2026-11", *ledger.db).stdout)
    # 15 of November's 30 days of 600 TPM at $30 per 1,000 TPM-month: $9.
    line = invoice["line_items"][0]
    assert (line["kind"], line["service_tier"], line["amount_usd"]) == ("reservation", "reserved", "9.000000000")
    assert invoice["total_usd"] == "9.000000000"

    ended = json.loads(tollgate("reservations", "end", made["id"], *ledger.db).stdout)
    assert ended["ends_at"] == made["ends_at"], "already over: its end stays"

    ledger.add("r1", "a", "ka")
    csv_out = ledger.export("--format", "csv").splitlines()
    tier = csv_out[0].split(",").index("service_tier")
    assert csv_out[1].split(",")[tier] == "default", csv_out
