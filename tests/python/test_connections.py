"""Connection abuse on the real server: request heads that never finish or trickle in, idle
keep-alive connections, and more connections than the listener allows."""

import os
import socket
import tempfile
import threading
import time

import httpx

from conftest import API_KEY, NO_END, ROOT, start_server, stop_server

MODEL = "smollm2-135m"


def config(tmp, extra):
    path = os.path.join(tmp, "models.toml")
    with open(path, "w") as f:
        f.write(
            "[server]\n" + extra +
            f'[models."{MODEL}"]\n'
            f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
            'backend = { type = "local", device = "cpu" }\n'
        )
    return path


def closed_within(sock, seconds):
    """Whether the server closes `sock` within `seconds` (reads until EOF or reset)."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_and_idle_connections_are_closed_at_the_header_timeout():
    tmp = tempfile.mkdtemp(prefix="tollgate-conn-")
    srv = start_server(extra_args=["--config", config(tmp, "header_read_timeout_secs = 2\n")])
    host, port = srv.addr.rsplit(":", 1)
    try:
        client = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
        assert client.get("/models").status_code == 200
        stalled, trickling, idle = [], [], []
        for _ in range(10):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        for _ in range(10):
            trickling.append(socket.create_connection((host, int(port))))
        for _ in range(5):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.append(s)
        stop = threading.Event()

        def trickle():
            line = 0
            while not stop.is_set():
                for s in trickling:
                    try:
                        s.sendall(b"X-Slow-%d: 1\r\n" % line if line else b"GET /health HTTP/1.1\r\n")
                    except OSError:
                        pass
                line += 1
                stop.wait(0.5)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        # Normal requests are served while the slow connections are open.
        for _ in range(5):
            assert client.get("/models").status_code == 200
        started = time.monotonic()
        results = [closed_within(s, 8) for s in stalled + trickling]
        stop.set()
        waited = time.monotonic() - started
        assert all(results), f"{results.count(False)} of 20 slow connections still open after {waited:.1f}s"
        # The idle keep-alive connections got their answer, then were closed too.
        for s in idle:
            s.settimeout(8)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            assert closed_within(s, 8)
        assert client.get("/models").status_code == 200
    finally:
        assert stop_server(srv) == 0


def test_connections_beyond_the_limit_are_refused_at_once():
    tmp = tempfile.mkdtemp(prefix="tollgate-conn-")
    # The held connections send nothing; a header deadline far above the test's own steps
    # keeps the server from closing them before the extra ones arrive on a slow machine.
    srv = start_server(extra_args=["--config", config(tmp, "max_connections = 8\nheader_read_timeout_secs = 60\n")])
    host, port = srv.addr.rsplit(":", 1)
    try:
        # The kernel's accept queue is first in, first out: the server takes the eight held ones
        # before the four extra ones, however long it takes to get to them.
        held = [socket.create_connection((host, int(port))) for _ in range(8)]
        extra = [socket.create_connection((host, int(port))) for _ in range(4)]
        assert all(closed_within(s, 10) for s in extra), "connections past the limit were kept open"
        for s in held:
            s.close()
        # Once the held ones are gone, requests are served again.
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(f"http://{srv.addr}/health", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not serve again after the flood"
            time.sleep(0.1)
        metrics = httpx.get(f"http://{srv.addr}/metrics").text
        refused = [l for l in metrics.splitlines() if l.startswith("tollgate_connections_refused_total ")]
        assert refused and float(refused[0].split()[1]) >= 4
    finally:
        assert stop_server(srv) == 0


def test_requests_beyond_max_inflight_are_shed_at_once_and_probes_still_answer():
    tmp = tempfile.mkdtemp(prefix="tollgate-shed-")
    srv = start_server(extra_args=["--config", config(tmp, "max_inflight_requests = 2\n")])
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count upwards."}],
        # Runs to max_tokens: in flight by construction while the test looks.
        "max_tokens": 4000,
        "logit_bias": NO_END,
        "stream": True,
    }
    client = httpx.Client(base_url=f"http://{srv.addr}", headers=headers, timeout=60)
    try:
        streams = []
        for _ in range(2):
            cm = client.stream("POST", "/v1/chat/completions", json=body)
            r = cm.__enter__()
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)  # the first event: the stream is running
            # The iterator is kept: dropping it would close the stream.
            streams.append((cm, lines))
        # Both slots are held by streams: a third request is answered at once.
        third = httpx.post(
            f"http://{srv.addr}/v1/chat/completions",
            headers=headers,
            json={**body, "stream": False, "max_tokens": 1},
            timeout=10,
        )
        assert third.status_code == 503, third.text
        assert third.headers["retry-after"] == "1"
        error = third.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "overloaded"), error
        # Probes and scrapes are outside the API's slots.
        assert httpx.get(f"http://{srv.addr}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"http://{srv.addr}/metrics", timeout=10).text
        shed = [l for l in metrics.splitlines() if l.startswith("tollgate_requests_shed_total ")]
        assert shed and float(shed[0].split()[1]) == 1, shed
        # A stream that ends (the client went away) gives its slot back.
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(
                f"http://{srv.addr}/v1/chat/completions",
                headers=headers,
                json={**body, "stream": False, "max_tokens": 1},
                timeout=30,
            )
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert time.monotonic() < deadline, "the slots were not given back"
            time.sleep(0.1)
    finally:
        client.close()
        assert stop_server(srv) == 0
