"""The HTTP server under /metrics, /healthz and /readyz of both processes, with bounded threads.

`start_metrics_server` is the one both the agent and the control service run: /metrics from a
registry (Prometheus text or OpenMetrics, as the scraper asks), /healthz and, where the process
has a notion of ready, /readyz.

http.server's ThreadingHTTPServer starts a thread per connection and reads the request on it
with no time limit, so every idle connection (or one trickling a byte now and then) held a
thread for ever, and enough of them exhaust the process. Here a connection gets a thread only
once its whole request has arrived:

- one reader thread collects requests from every open connection (non-blocking, one selector);
  a connection costs a file descriptor while it is incomplete, never a thread;
- at most `max_pending` incomplete connections are kept: a new one beyond that closes the
  oldest, so a flood of idle connections pushes out idle connections, while a real client
  (Prometheus, a kubelet probe) sends its request at once and is read before its turn comes;
- an incomplete request is dropped after `deadline_s`, and one larger than `MAX_REQUEST_BYTES`
  at once (a GET is a line and a few headers);
- complete requests are answered by `workers` threads (the handler as http.server runs it, from
  the buffered request), each answer bounded by `deadline_s` of sending; when every worker is
  busy and `workers` more requests wait, further ones are closed.

`refused` and `expired` count connections closed for these reasons.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 256
DEFAULT_WORKERS = 4
DEFAULT_DEADLINE_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024
_TICK_S = 0.25
_END_OF_HEADERS = b"\r\n\r\n"


class _Buffered:
    """A connection whose request has been read already: http.server reads it from memory."""

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self._sock = sock
        self._request = request

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        # Only for reading: http.server writes through sendall (its wbufsize is 0).
        return io.BytesIO(self._request)

    def __getattr__(self, name: str) -> Any:  # sendall, settimeout, shutdown, close, ...
        return getattr(self._sock, name)


class _Pending:
    __slots__ = ("address", "data", "deadline")

    def __init__(self, address: Any, deadline: float) -> None:
        self.address = address
        self.data = b""
        self.deadline = deadline


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer whose threads stay bounded whatever connects (see the module docstring)."""

    # The listen backlog (socketserver's default is 5): during a burst of connections the kernel
    # keeps this many waiting for accept() instead of dropping SYNs (a 1 s retransmit each).
    request_queue_size = 128

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_pending: int = DEFAULT_MAX_PENDING,
        workers: int = DEFAULT_WORKERS,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        if ":" in server_address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(server_address, handler)
        self.max_pending = max_pending
        self.deadline_s = deadline_s
        self.refused = 0
        self.expired = 0
        self._closed = threading.Event()
        self._incoming: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)  # a full pipe already wakes the reader
        self._pending: collections.OrderedDict[socket.socket, _Pending] = collections.OrderedDict()
        self._ready: queue.Queue[tuple[socket.socket, Any, bytes]] = queue.Queue(maxsize=workers)
        threading.Thread(target=self._read_requests, name="metrics-http-reader", daemon=True).start()
        for n in range(workers):
            threading.Thread(target=self._answer, name=f"metrics-http-{n}", daemon=True).start()

    # --- the accept loop (serve_forever's thread) hands every connection to the reader -------------

    def process_request(self, request: Any, client_address: Any) -> None:
        self._incoming.put((request, client_address))
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    # --- the reader ----------------------------------------------------------------------------------

    def _read_requests(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._closed.is_set():
                try:
                    events = selector.select(_TICK_S)
                except OSError:  # the wake-up socket closed under us: the server is closing
                    break
                for key, _ in events:
                    if key.fileobj is self._wake_read:
                        self._take_new(selector)
                    else:
                        self._receive(selector, key.fileobj)  # type: ignore[arg-type]
                self._expire(selector, time.monotonic())
            for sock in list(self._pending):
                self._drop(selector, sock)

    def _take_new(self, selector: selectors.BaseSelector) -> None:
        with contextlib.suppress(OSError):
            self._wake_read.recv(4096)
        while True:
            try:
                sock, address = self._incoming.get_nowait()
            except queue.Empty:
                return
            if len(self._pending) >= self.max_pending:
                oldest = next(iter(self._pending))
                self._drop(selector, oldest)
                self.refused += 1
            sock.setblocking(False)
            self._pending[sock] = _Pending(address, time.monotonic() + self.deadline_s)
            selector.register(sock, selectors.EVENT_READ)

    def _receive(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        entry = self._pending.get(sock)
        if entry is None:
            return
        try:
            chunk = sock.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, sock)
            return
        entry.data += chunk
        if _END_OF_HEADERS in entry.data:
            selector.unregister(sock)
            del self._pending[sock]
            sock.setblocking(True)
            sock.settimeout(self.deadline_s)  # sendall: the whole answer within the deadline
            try:
                self._ready.put_nowait((sock, entry.address, entry.data))
            except queue.Full:
                self.refused += 1
                self._close(sock)
        elif len(entry.data) > MAX_REQUEST_BYTES:
            self.refused += 1
            self._drop(selector, sock)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        while self._pending:
            sock, entry = next(iter(self._pending.items()))
            if entry.deadline > now:
                return  # in arrival order, so the rest are younger
            self.expired += 1
            self._drop(selector, sock)

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        self._pending.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)
        self._close(sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.close()

    # --- the workers ---------------------------------------------------------------------------------

    def _answer(self) -> None:
        while True:
            sock, address, request = self._ready.get()
            buffered = _Buffered(sock, request)
            try:
                self.finish_request(buffered, address)  # type: ignore[arg-type]
            except Exception:
                log.debug("metrics HTTP request from %s failed", address, exc_info=True)
            finally:
                self.shutdown_request(buffered)  # type: ignore[arg-type]

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
        for end in (self._wake_read, self._wake_write):
            self._close(end)


def split_host_port(text: str) -> tuple[str, int]:
    """ "HOST:PORT", "[v6]:PORT" or ":PORT" (every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics_server(
    address: str,
    registry: CollectorRegistry,
    healthy: Callable[[], bool] = lambda: True,
    ready: Callable[[], bool] | None = None,
    not_ready: str = "not ready",
    health_detail: Callable[[], str] | None = None,
) -> tuple[BoundedHTTPServer, int]:
    """Serve on `address` ("HOST:PORT"; port 0 picks one) from a daemon thread: /metrics,
    /healthz (200 while `healthy()`, else 503; `health_detail()` adds a line to the body) and, if
    `ready` is given, /readyz (200 while `ready()`, else 503 saying `not_ready`). Returns the
    server (shutdown() stops it) and the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(registry), content_type)
            elif path == "/healthz":
                ok = healthy()
                text = "ok\n" if ok else "starting\n"
                if health_detail is not None:
                    text += health_detail() + "\n"
                self._reply(200 if ok else 503, text.encode())
            elif path == "/readyz" and ready is not None:
                if ready():
                    self._reply(200, b"ready\n")
                else:
                    self._reply(503, f"{not_ready}\n".encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Prometheus scrapes every few seconds; per-request access logs would drown the rest.
            pass

    server = BoundedHTTPServer(split_host_port(address), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, server.server_address[1]
