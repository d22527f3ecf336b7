"""What `tollgate serve` logs for its operator (issue 29, item 8): a line at start when the admin
API is disabled, a warning when `/metrics` (and the admin API) share the public listener, no
per-request line for `/health` and `/metrics` (probes and scrapes), and no ANSI colours when
stderr is not a terminal (here a pipe, as under systemd or a log collector)."""

import time

import httpx

from conftest import API_KEY, start_server, stop_server


def wait_for(log, needle, what):
    """Waits until a log line contains `needle` (the server logs after it answers)."""
    for _ in range(600):
        if any(needle in line for line in log):
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line with {what}:\n" + "".join(log[-30:]))


def test_start_lines_quiet_probes_and_plain_text_when_not_a_terminal():
    srv = start_server({"RUST_LOG": "info,tollgate_gateway=debug"})
    try:
        base = f"http://{srv.addr}"
        for _ in range(3):
            assert httpx.get(f"{base}/health", timeout=60).status_code == 200
            assert httpx.get(f"{base}/metrics", timeout=60).status_code == 200
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 200
        # The request line of /v1/models is there: requests are logged at debug...
        wait_for(srv.log, "route=/v1/models", "the /v1/models request")
    finally:
        assert stop_server(srv) == 0
    log = "".join(srv.log)
    # ...but not the probes'.
    assert "route=/health" not in log and "route=/metrics" not in log, log
    assert "\x1b[" not in log, "ANSI escapes in a log that is not a terminal"
    disabled = [line for line in srv.log if "admin API" in line and "disabled" in line]
    assert disabled and "TOLLGATE_ADMIN_TOKEN" in disabled[0], log
    public = [line for line in srv.log if "WARN" in line and "/metrics" in line and "--admin-listen" in line]
    assert public, log


def test_the_admin_api_on_the_public_listener_is_warned_about():
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": "logs-admin"})
    try:
        r = httpx.get(f"http://{srv.addr}/admin/v1/customers",
                      headers={"Authorization": "Bearer logs-admin"}, timeout=60)
        assert r.status_code == 200
    finally:
        assert stop_server(srv) == 0
    assert not any("admin API" in line and "disabled" in line for line in srv.log)
    warning = [line for line in srv.log if "WARN" in line and "--admin-listen" in line]
    assert warning and "admin API" in warning[0], "".join(srv.log)
