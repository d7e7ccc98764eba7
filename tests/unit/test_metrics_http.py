"""The metrics HTTP servers of the agent and the control service under idle and trickling
connections: threads stay bounded, and /metrics, /healthz (and /readyz) keep answering."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.metrics_http import MAX_REQUEST_BYTES, BoundedHTTPServer, start_metrics_server
from tests.unit.control_helpers import wait_until

IDLE = 300


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("podfence_test_requests", "a metric to scrape", registry=registry).inc()
    return registry


@pytest.fixture(params=["agent", "control"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[BoundedHTTPServer, str]]:
    if request.param == "agent":
        # as the agent runs it: always healthy, ready once a policy version is applied
        httpd, port = start_metrics_server("127.0.0.1:0", _registry(), ready=lambda: True)
    else:
        # as the control service runs it: healthy once the source has been read, no /readyz
        healthy = threading.Event()
        healthy.set()
        httpd, port = start_metrics_server("127.0.0.1:0", _registry(), healthy=healthy.is_set)
    yield httpd, f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_idle_connections_hold_no_threads_and_metrics_still_answer(server):
    httpd, base = server
    port = httpd.server_address[1]
    before = threading.active_count()
    idle = [_connect(port) for _ in range(IDLE)]
    # A few clients trickling a request a byte at a time, as a slow-loris attack does.
    trickling = [_connect(port) for _ in range(20)]
    for sock in trickling:
        sock.sendall(b"GET /metr")
    try:
        time.sleep(0.5)
        assert threading.active_count() <= before + 2, "a thread per idle connection"
        started = time.monotonic()
        status, body = _get(f"{base}/metrics")
        assert status == 200 and b"podfence_test_requests_total 1.0" in body
        assert _get(f"{base}/healthz")[0] == 200
        assert time.monotonic() - started < 1.0
        assert threading.active_count() <= before + 2
    finally:
        for sock in idle + trickling:
            sock.close()


def test_a_flood_beyond_the_pending_limit_closes_the_oldest_idle_connections(server):
    httpd, base = server
    port = httpd.server_address[1]
    flood = [_connect(port) for _ in range(httpd.max_pending + 50)]
    try:
        wait_until(lambda: httpd.refused >= 50, timeout=5, what="the oldest idle connections closed")
        flood[0].settimeout(2)
        assert flood[0].recv(1) == b"", "the oldest was closed by the server"
        assert _get(f"{base}/healthz")[0] == 200
    finally:
        for sock in flood:
            sock.close()


def test_an_incomplete_request_is_dropped_at_its_deadline_and_an_oversized_one_at_once():
    httpd = BoundedHTTPServer(("127.0.0.1", 0), _Ok, deadline_s=0.5)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        slow = _connect(port)
        slow.sendall(b"GET / HTTP/1.1\r\n")  # and never the end of the headers
        huge = _connect(port)
        huge.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_BYTES + 10))
        huge.settimeout(2)
        assert huge.recv(1) == b""
        slow.settimeout(3)
        started = time.monotonic()
        assert slow.recv(1) == b""
        assert time.monotonic() - started < 1.5
        assert httpd.expired == 1 and httpd.refused == 1
        ok = _connect(port)
        ok.sendall(b"GET / HTTP/1.0\r\n\r\n")
        ok.settimeout(2)
        assert ok.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        httpd.shutdown()
        httpd.server_close()
