"""The Files API with the official OpenAI SDK: upload (JSONL, checked line by line), list, retrieve,
content and delete; files are their customer's (another customer's key gets 404), count against
the storage quota and expire; bytes in a local directory, and in an S3-compatible store (moto's
server, a real HTTP S3 endpoint) with `--files-url s3://bucket/prefix`. On a SQLite ledger, and on
PostgreSQL."""

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ROOT, customer_keys, free_port, start_server, stop_server, write_config
from billing_common import pg

ADMIN = "files-admin"
# Small enough that a test can fill it: 3 files of LINES' size fit, a fourth does not.
QUOTA = 3000


def lines(n: int, prefix: str = "req") -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"
        for i in range(n)
    )


def quota_config() -> str:
    text = re.sub(r"(?m)^files_quota_bytes *=.*\n", "", (ROOT / "models.toml").read_text())
    text = text.replace("[server]\n", f"[server]\nfiles_quota_bytes = {QUOTA}\n", 1)
    text = text.replace('path = "models/', f'path = "{ROOT}/models/')
    return write_config("tollgate-files-", text)


def clients(srv, customers):
    keys = customer_keys(srv, ADMIN, customers)
    return [OpenAI(base_url=srv.base_url, api_key=keys[c], max_retries=0, timeout=60) for c in customers]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def srv(request):
    """A server on a SQLite ledger, then on PostgreSQL (TOLLGATE_TEST_POSTGRES=1)."""
    args = ["--config", quota_config()]
    if request.param == "postgres":
        if not os.environ.get("TOLLGATE_TEST_POSTGRES"):
            pytest.skip("needs TOLLGATE_TEST_POSTGRES=1 and root for scripts/postgres.sh (scripts/test.sh sets it)")
        tmp = tempfile.mkdtemp(prefix="tollgate-files-")
        args += ["--database", pg("reset"), "--spool", os.path.join(tmp, "ledger.spool"),
                 "--files-url", os.path.join(tmp, "files")]
    s = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, args)
    yield s
    assert stop_server(s) == 0, "".join(s.log[-40:])


@pytest.fixture(scope="module")
def two(srv):
    return clients(srv, ("files-a", "files-b"))


def test_upload_list_retrieve_content_delete(two):
    a, b = two
    body = lines(3)
    f = a.files.create(file=("requests.jsonl", io.BytesIO(body)), purpose="batch")
    assert (f.object, f.bytes, f.filename, f.purpose, f.status) == ("file", len(body), "requests.jsonl", "batch", "processed")
    # Batch files expire after 30 days unless told otherwise.
    assert f.id.startswith("file-") and f.created_at > 0 and f.expires_at == f.created_at + 30 * 86400
    assert a.files.retrieve(f.id).model_dump() == f.model_dump()
    assert a.files.content(f.id).read() == body
    listed = [x.id for x in a.files.list()]
    assert f.id in listed
    # Another customer sees none of it.
    assert f.id not in [x.id for x in b.files.list()]
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id).read(), lambda: b.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    deleted = a.files.delete(f.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        a.files.delete(f.id)


def test_upload_from_a_file_on_disk_and_pages(two, tmp_path):
    a, _ = two
    path = tmp_path / "input.jsonl"
    path.write_bytes(lines(2, "disk"))
    ids = []
    for _ in range(3):
        with open(path, "rb") as fh:
            ids.append(a.files.create(file=fh, purpose="batch").id)
    page = a.files.list(limit=2, order="asc", purpose="batch")
    assert page.has_more is True and len(page.data) == 2
    # The SDK's auto-paging follows `after` to the end.
    everything = [x.id for x in a.files.list(limit=1, order="asc")]
    assert everything[-3:] == ids
    desc = [x.id for x in a.files.list(limit=2).data]
    assert desc == ids[::-1][:2]
    for i in ids:
        a.files.delete(i)


def test_a_line_that_is_not_json_is_refused_with_its_number(two):
    a, _ = two
    bad = lines(2) + b'{"custom_id": "x", oops}\n' + lines(1)
    with pytest.raises(openai.BadRequestError) as e:
        a.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    assert "line 3 is not valid JSON" in e.value.message
    assert e.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        a.files.create(file=("x.jsonl", io.BytesIO(lines(1))), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    assert all(not x.filename.startswith("bad") for x in a.files.list())


def test_the_storage_quota_refuses_an_upload_past_it(srv):
    (c,) = clients(srv, ("files-quota",))
    one = lines(6, "q")
    assert len(one) * 3 <= QUOTA < len(one) * 4
    kept = [c.files.create(file=("q.jsonl", io.BytesIO(one)), purpose="batch").id for _ in range(3)]
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("q.jsonl", io.BytesIO(one)), purpose="batch")
    assert "storage quota" in e.value.message
    assert len([x for x in c.files.list()]) == 3
    c.files.delete(kept[0])
    c.files.create(file=("q.jsonl", io.BytesIO(one)), purpose="batch")


def test_expires_after_sets_the_expiry(two):
    a, _ = two
    f = a.files.create(file=("e.jsonl", io.BytesIO(lines(1))), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    assert a.files.retrieve(f.id).expires_at == f.expires_at
    with pytest.raises(openai.BadRequestError) as e:
        a.files.create(file=("e.jsonl", io.BytesIO(lines(1))), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 5})
    assert e.value.body["param"] == "expires_after.seconds"
    a.files.delete(f.id)


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server on a free port, with a bucket `tollgate`."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.put(f"{url}/tollgate", timeout=2).raise_for_status()
            break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_files_in_an_s3_compatible_store(moto):
    env = {
        "TOLLGATE_ADMIN_TOKEN": ADMIN,
        "AWS_ENDPOINT_URL": moto,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    s = start_server(env, ["--files-url", "s3://tollgate/some/prefix"])
    try:
        (c,) = clients(s, ("files-s3",))
        body = lines(500, "s3")  # more than one chunk of the multipart stream
        f = c.files.create(file=("s3.jsonl", io.BytesIO(body)), purpose="batch")
        assert f.bytes == len(body)
        # The bytes are in the bucket under the prefix, named by the file's id.
        listing = httpx.get(f"{moto}/tollgate", params={"list-type": "2", "prefix": "some/prefix/"}).text
        assert re.findall(r"<Key>([^<]+)</Key>", listing) == [f"some/prefix/{f.id}"]
        assert c.files.content(f.id).read() == body
        c.files.delete(f.id)
        listing = httpx.get(f"{moto}/tollgate", params={"list-type": "2", "prefix": "some/prefix/"}).text
        assert "<Key>" not in listing
    finally:
        assert stop_server(s) == 0, "".join(s.log[-40:])
