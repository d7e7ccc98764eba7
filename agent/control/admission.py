"""Admission of Sync streams: who a caller is, and how many streams it (and everyone) may hold.

Every open stream holds a server thread, so streams are a resource an attacker can exhaust: a
stream that never says Hello would hold its thread forever, and a couple of thousand of them
lock every agent out. Three bounds keep the service answering:

- a stream must say Hello within `hello_timeout_s` (server.py enforces it);
- one client may have at most `max_pending_per_client` streams still waiting for their Hello
  (a client is its certificate's CN with mutual TLS, else its address). After Hello a node
  holds one stream: a newer one replaces it, and with mutual TLS the node is the certificate's;
- all clients together hold at most `max_streams` streams, fewer than the server's threads,
  so GetStatus and health checks always find one. gRPC itself refuses any call beyond the
  thread pool at once (`maximum_concurrent_rpcs`) rather than queueing it behind idle streams.

A refused stream ends at once with RESOURCE_EXHAUSTED and a message saying which bound, and
`podfence_control_streams_refused_total{reason}` counts it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import grpc

REASON_HELLO_TIMEOUT = "hello_timeout"
REASON_CLIENT_LIMIT = "client_limit"
REASON_TOTAL_LIMIT = "total_limit"
REASON_IDENTITY = "identity"  # token mode: no valid agent token, or it could not be checked
REFUSAL_REASONS = (REASON_HELLO_TIMEOUT, REASON_CLIENT_LIMIT, REASON_TOTAL_LIMIT, REASON_IDENTITY)


def client_identity(context: grpc.ServicerContext, tls: bool) -> str:
    """The caller: "cn:<subject CN>" with mutual TLS, else "addr:<peer address without port>"."""
    if tls:
        names = sorted(v.decode(errors="replace") for v in context.auth_context().get("x509_common_name", []))
        return "cn:" + ",".join(names)
    peer = context.peer()  # "ipv4:10.0.0.1:5555", "ipv6:[fd00::1]:5555", "unix:/path"
    scheme, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] if scheme in ("ipv4", "ipv6") else rest
    return f"addr:{host or peer}"


class StreamAdmission:
    """Counts streams per client and in total; `enter` admits or says why not."""

    def __init__(self, max_streams: int, max_pending_per_client: int, refused: Callable[[str], None]) -> None:
        self._max_streams = max_streams
        self._max_pending = max_pending_per_client
        self._refused = refused
        self._lock = threading.Lock()
        self._open = 0
        self._pending: Counter[str] = Counter()

    def enter(self, client: str) -> str | None:
        """Admits a new stream of `client` (pending until `greeted`); None, or why it is refused."""
        with self._lock:
            if self._open >= self._max_streams:
                reason = REASON_TOTAL_LIMIT
                message = f"the control service holds its limit of {self._max_streams} streams"
            elif self._pending[client] >= self._max_pending:
                reason, message = (
                    REASON_CLIENT_LIMIT,
                    f"{client} already has {self._max_pending} streams waiting for their Hello",
                )
            else:
                self._open += 1
                self._pending[client] += 1
                return None
        self._refused(reason)
        return message

    def greeted(self, client: str) -> None:
        """The stream said Hello: it no longer counts against its client's pending streams."""
        with self._lock:
            self._unpend_locked(client)

    def leave(self, client: str, pending: bool) -> None:
        with self._lock:
            self._open -= 1
            if pending:
                self._unpend_locked(client)

    def _unpend_locked(self, client: str) -> None:
        self._pending[client] -= 1
        if self._pending[client] <= 0:
            del self._pending[client]

    @property
    def open_streams(self) -> int:
        with self._lock:
            return self._open

    @property
    def awaiting_hello(self) -> int:
        """Streams admitted that have not said Hello yet."""
        with self._lock:
            return sum(self._pending.values())
