"""The control service's gRPC server: NodeSync.Sync streams, ControlStatus, and gRPC health.

Sync requests are taken as raw bytes and parsed here, so a message that is not an AgentMessage
ends only that stream, with INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL).
Messages above the receive limit are refused by grpc itself with RESOURCE_EXHAUSTED.

Which node a stream may speak for comes from one of two identities: with mutual TLS alone it is
the client certificate's common name; in token mode (identity.py) it is the node of the agent pod
whose service-account token the call carries, found by TokenReview and the pod cache. Either way
an agent of node A cannot ask for node B's policy (PERMISSION_DENIED).

Streams are admitted within bounds (admission.py): Hello within a deadline, a few streams per
client awaiting Hello, a total below the thread pool. GetStatus answers with mutual TLS only what
the caller may see: a node's certificate sees its own node's entry; a certificate whose CN is one
of `admin_names` sees every node and the source's errors. In token mode an agent's token sees its
own node's entry and an admin user's token everything. Without TLS there is no caller identity,
and anyone who can reach the port can subscribe as any node anyway: status shows everything.

Every version sent carries the source state it was built from (hub.py), and an agent that asks
for heartbeats gets one on an idle stream, so it can tell a wedged replica from a quiet one.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.admission import REASON_HELLO_TIMEOUT, REASON_IDENTITY, StreamAdmission, client_identity
from agent.control.balance import SHUTTING_DOWN, drain
from agent.control.encode import delta_message, snapshot_message
from agent.control.hub import AckError, HubStatus, PolicyHub, StreamClosed, StreamHandle
from agent.control.identity import IdentityError, TokenAuthenticator, bearer_token
from agent.control.metrics import ControlMetrics
from agent.control.tls_files import TlsFiles as TlsFiles  # re-exported: older imports

log = logging.getLogger(__name__)

DEFAULT_ADMIN_NAME = "podfence-admin"  # the CN of an operator's certificate for `podfence status`
SYNC_SERVICE = "podfence.v1.NodeSync"
STATUS_SERVICE = "podfence.v1.ControlStatus"
# A Kubernetes node name is a DNS-1123 subdomain.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class ServerSettings:
    """Transport settings; the defaults suit a cluster of a few thousand nodes."""

    # Largest message sent (a snapshot of a busy node) and largest accepted (agents send tiny ones).
    max_send_bytes: int = 64 * 1024 * 1024
    max_receive_bytes: int = 4 * 1024 * 1024
    # Every open stream holds one worker thread. Calls beyond the pool are refused at once
    # (never queued behind idle streams); Sync streams stop `reserved_workers` short of it, so
    # GetStatus always finds a thread.
    max_workers: int = 2048
    reserved_workers: int = 48
    # A stream must say Hello this soon; a client may have this many streams awaiting Hello.
    hello_timeout_s: float = 10.0
    max_pending_per_client: int = 8

    @property
    def max_streams(self) -> int:
        """Sync streams at most: the pool less its reserve (at most a quarter of a small pool)."""
        return max(1, self.max_workers - min(self.reserved_workers, self.max_workers // 4))
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    # Agents ping at most this often while idle (their keepalive must not be shorter).
    min_client_ping_interval_ms: int = 10_000


class ServerTls(Protocol):
    """TLS material for the server: fixed (TlsFiles) or re-read on change (ReloadingTlsFiles)."""

    @property
    def require_client_auth(self) -> bool: ...
    def server_credentials(self) -> grpc.ServerCredentials: ...


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def stream_admission(settings: ServerSettings, metrics: ControlMetrics) -> StreamAdmission:
    """The admission bounds of `settings`, counting refusals in `metrics`."""
    return StreamAdmission(
        max_streams=settings.max_streams,
        max_pending_per_client=settings.max_pending_per_client,
        refused=lambda reason: metrics.streams_refused_total.labels(reason).inc(),
    )


class _Inbound:
    """The client's side of one stream, read on its own thread: Hello first (handed to the
    stream's handler, which waits for it with a deadline), then acks once the handler has
    registered the stream."""

    def __init__(self) -> None:
        self.hello: queue.Queue[pb.Hello | _Abort] = queue.Queue(maxsize=1)
        self._handle: StreamHandle | None = None
        self._decided = threading.Event()

    def start_acks(self, handle: StreamHandle | None) -> None:
        """Lets the reader go on to acks for `handle`; None ends the reader (the stream was refused)."""
        self._handle = handle
        self._decided.set()

    def handle(self) -> StreamHandle | None:
        self._decided.wait()
        return self._handle


class NodeSyncService:
    """NodeSync.Sync: Hello, then a snapshot and deltas out, acks in."""

    def __init__(self, hub: PolicyHub, require_client_cert: bool, settings: ServerSettings | None = None,
                 admission: StreamAdmission | None = None,
                 authenticator: TokenAuthenticator | None = None) -> None:
        self._hub = hub
        self._require_client_cert = require_client_cert
        self._authenticator = authenticator
        self._settings = settings or ServerSettings()
        self.admission = admission or stream_admission(self._settings, hub.metrics)

    def sync(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.ControlMessage]:
        if self._hub.draining:
            # Shutting down: the agent's next address is another replica.
            context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down: this replica takes no new streams")
            return
        client = client_identity(context, self._require_client_cert)
        refusal = self.admission.enter(client)
        if refusal is not None:
            log.warning("refused a Sync stream from %s (%s): %s", context.peer(), client, refusal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return
        pending = [True]  # whether this stream still counts as awaiting Hello

        def release() -> None:
            self.admission.leave(client, pending=pending[0])

        if not context.add_callback(_once(release)):
            release()  # the call ended before the callback could be added
            return
        bound_node: str | None = None  # token mode: the node of the caller's agent pod
        if self._authenticator is not None:
            try:
                bound_node = self._authenticator.agent_node(bearer_token(context.invocation_metadata()))
            except IdentityError as failure:
                log.warning("refused a Sync stream from %s: %s", context.peer(), failure.message)
                self._hub.metrics.streams_refused_total.labels(REASON_IDENTITY).inc()
                context.abort(failure.code, failure.message)
                return
        inbound = _Inbound()
        reader = threading.Thread(target=self._read, args=(requests, context, inbound, bound_node),
                                  name="sync-reader", daemon=True)
        reader.start()
        handle: StreamHandle | None = None
        try:
            try:
                hello = self._await_hello(inbound)
            except _Abort as failure:
                log.warning("refused a Sync stream from %s: %s", context.peer(), failure.details)
                context.abort(failure.code, failure.details)
                return
            self.admission.greeted(client)
            pending[0] = False
            handle = self._hub.open_stream(hello.node_name, hello.last_applied_version, hello.enforces_tiers)
            if not hello.enforces_tiers:
                log.warning("node %s: agent %r does not say it enforces ClusterNetworkPolicy tiers; its "
                            "pods' directions with ClusterNetworkPolicy are sent as deny all",
                            hello.node_name, hello.agent_version)
            opened = handle
            context.add_callback(lambda: opened.close("the stream ended"))
            inbound.start_acks(handle)
            yield from self._send(handle, context, _heartbeat_interval(hello))
        finally:
            if handle is None:
                inbound.start_acks(None)  # the reader stops instead of waiting for a stream
            else:
                self._hub.close_stream(handle, "the stream ended")

    def _await_hello(self, inbound: _Inbound) -> pb.Hello:
        timeout = self._settings.hello_timeout_s
        try:
            first = inbound.hello.get(timeout=timeout)
        except queue.Empty:
            self._hub.metrics.streams_refused_total.labels(REASON_HELLO_TIMEOUT).inc()
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {timeout:g} s") from None
        if isinstance(first, _Abort):
            raise first
        return first

    def _read(self, requests: Iterator[bytes], context: grpc.ServicerContext, inbound: _Inbound,
              bound_node: str | None) -> None:
        try:
            inbound.hello.put(self._read_hello(requests, context, bound_node))
        except _Abort as failure:
            inbound.hello.put(failure)
            return
        except grpc.RpcError:
            inbound.hello.put(_Abort(grpc.StatusCode.CANCELLED, "the stream ended before Hello"))
            return
        handle = inbound.handle()
        if handle is not None:
            self._read_acks(requests, handle)

    def _read_hello(self, requests: Iterator[bytes], context: grpc.ServicerContext,
                    bound_node: str | None) -> pb.Hello:
        raw = next(requests, None)
        if raw is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before Hello")
        message = _parse(raw)
        if message.WhichOneof("body") != "hello":
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        node = message.hello.node_name
        if len(node) > 253 or not _NODE_NAME.match(node):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid node name {node!r}")
        if self._authenticator is not None:
            if node != bound_node:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the token of an agent pod on node {bound_node!r} may not subscribe as node {node!r}",
                )
        elif self._require_client_cert:
            names = _common_names(context)
            if node not in names:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client certificate for {names or 'no name'} may not subscribe as node {node!r}",
                )
        return message.hello

    def _read_acks(self, requests: Iterator[bytes], handle: StreamHandle) -> None:
        try:
            for raw in requests:
                message = _parse(raw)
                if message.WhichOneof("body") == "state_repairs":
                    self._hub.state_repairs(handle, message.state_repairs.total, message.state_repairs.last)
                    continue
                if message.WhichOneof("body") != "ack":
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "after Hello only Acks are allowed")
                ack = message.ack
                try:
                    self._hub.ack(handle, ack.version, ack.ok, ack.error, tuple(ack.rejected_policies))
                except AckError as exc:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except _Abort as failure:
            log.warning("node %s sent a malformed message: %s", handle.node, failure.details)
            handle.close(failure.details, client_error=True)
        except grpc.RpcError:
            pass  # the stream is gone; the sender side notices through the context callback
        else:
            handle.close("the agent closed its side of the stream")

    def _send(self, handle: StreamHandle, context: grpc.ServicerContext,
              heartbeat_s: float | None) -> Iterator[pb.ControlMessage]:
        last_sent = time.monotonic()
        while True:
            wait = 5.0
            if heartbeat_s is not None:
                wait = max(0.0, min(wait, last_sent + heartbeat_s - time.monotonic()))
            try:
                item = handle.next(timeout=wait)
            except StreamClosed as closed:
                if closed.client_error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, closed.reason)
                if closed.reason.startswith("superseded"):
                    context.abort(grpc.StatusCode.CANCELLED, closed.reason)
                if closed.reason.startswith((SHUTTING_DOWN, "rebalancing")):
                    context.abort(grpc.StatusCode.UNAVAILABLE, closed.reason)
                return
            if item is None:
                if not context.is_active():
                    return
                if heartbeat_s is not None and time.monotonic() - last_sent >= heartbeat_s:
                    last_sent = time.monotonic()
                    yield pb.ControlMessage(heartbeat=pb.Heartbeat(sent_unix_ms=time.time_ns() // 1_000_000))
                continue
            if item.snapshot or handle.last_sent is None:
                started = time.perf_counter()
                message = snapshot_message(item.version, item.policy)
                self._hub.metrics.snapshot_build_seconds.observe(
                    item.build_seconds + time.perf_counter() - started
                )
            else:
                message = delta_message(item.version, handle.last_sent, item.policy)
            handle.mark_sent(item.version, item.policy)
            message.source.CopyFrom(pb.SourceState(
                generation=item.source.generation, digest=item.source.digest, replica=self._hub.replica
            ))
            message.accepts_state_repairs = True
            last_sent = time.monotonic()
            yield message


MIN_HEARTBEAT_S = 0.1  # an agent cannot make the service spin


def _heartbeat_interval(hello: pb.Hello) -> float | None:
    """Seconds between heartbeats on an idle stream, as the agent asked (None: it did not)."""
    if not hello.heartbeat_interval_ms:
        return None
    return max(MIN_HEARTBEAT_S, hello.heartbeat_interval_ms / 1000)


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    done = threading.Event()

    def run() -> None:
        if not done.is_set():
            done.set()
            callback()

    return run


def _common_names(context: grpc.ServicerContext) -> list[str]:
    return [v.decode(errors="replace") for v in context.auth_context().get("x509_common_name", [])]


def _parse(raw: bytes) -> pb.AgentMessage:
    try:
        return pb.AgentMessage.FromString(raw)
    except DecodeError as exc:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"not an AgentMessage: {exc}") from exc


class ControlStatusService(pb_grpc.ControlStatusServicer):
    """GetStatus, scoped to the caller with mutual TLS (see the module docstring)."""

    def __init__(self, hub: PolicyHub, tls: bool = False, admin_names: Collection[str] = (),
                 authenticator: TokenAuthenticator | None = None) -> None:
        self._hub = hub
        self._tls = tls
        self._admin_names = frozenset(admin_names)
        self._authenticator = authenticator

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        status = self._visible(self._hub.status(), context)
        response = pb.StatusResponse(
            version=status.version,
            source=pb.SourceState(generation=status.source.generation, digest=status.source.digest,
                                  replica=self._hub.replica),
            sync_streams=status.streams,
            draining=status.draining,
        )
        for node, record in status.nodes.items():
            response.nodes[node].CopyFrom(
                pb.NodeStatus(
                    applied_version=record.acked_version,
                    connected=record.connected,
                    last_error=record.last_error or "",
                    state_repairs=record.state_repairs,
                    last_repair=record.last_repair,
                    rejected_policies=record.rejected_policies,
                    tier_fallback=record.tier_fallback,
                )
            )
        for problem in status.source_errors:
            response.source_errors.append(
                pb.SourceError(
                    object=problem.object or "",
                    source=problem.source,
                    error=problem.error,
                    last_valid_in_force=problem.last_valid_in_force,
                )
            )
        if status.source_freshness is not None:
            fresh = status.source_freshness
            response.source_freshness.CopyFrom(pb.SourceFreshness(
                source=fresh.source, seconds_since_heard=fresh.seconds_since_heard, stale=fresh.stale,
                stale_after_seconds=fresh.stale_after_seconds,
            ))
        return response

    def _visible(self, status: HubStatus, context: grpc.ServicerContext) -> HubStatus:
        if not self._tls and self._authenticator is None:
            return status
        names = set(_common_names(context)) if self._tls else set()
        if names & self._admin_names:
            return status
        if self._authenticator is not None:
            # Token mode: an admin user's token sees everything, an agent's token its own node.
            try:
                caller = self._authenticator.caller(bearer_token(context.invocation_metadata()))
            except IdentityError as failure:
                context.abort(failure.code, failure.message)
            if caller.admin:
                return status
            names = {caller.node} if caller.node else set()
        # A node's certificate: its own entry only. Other nodes' errors and the source's errors
        # name other tenants' objects, and a compromised node has no business reading them.
        own = {node: record for node, record in status.nodes.items() if node in names}
        return replace(status, nodes=own, source_errors=())


def create_server(
    addr: str,
    hub: PolicyHub,
    credentials: ServerTls | None = None,
    settings: ServerSettings | None = None,
    admin_names: Collection[str] = (DEFAULT_ADMIN_NAME,),
    admission: StreamAdmission | None = None,
    authenticator: TokenAuthenticator | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds (not starts) the server bound to `addr` ("host:0" picks a port); returns its port too.
    With client certificates, those whose CN is in `admin_names` see all of GetStatus. With an
    `authenticator` (token mode) streams are bound to nodes by service-account tokens instead of
    certificate names; client certificates then only secure the transport."""
    settings = settings or ServerSettings()
    options = [
        ("grpc.max_send_message_length", settings.max_send_bytes),
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", settings.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
        options=options,
        # A call the pool cannot take now is refused (RESOURCE_EXHAUSTED), never queued behind
        # streams that may stay open for hours.
        maximum_concurrent_rpcs=settings.max_workers,
    )
    client_certs = credentials is not None and credentials.require_client_auth
    if credentials is not None and not client_certs and authenticator is None:
        raise ValueError("without a token authenticator the node identity needs client certificates (a CA)")
    sync = NodeSyncService(hub, require_client_cert=client_certs, settings=settings,
                           admission=admission, authenticator=authenticator)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SYNC_SERVICE,
                {
                    # No request deserializer: raw bytes, parsed by NodeSyncService itself.
                    "Sync": grpc.stream_stream_rpc_method_handler(
                        sync.sync, response_serializer=pb.ControlMessage.SerializeToString
                    )
                },
            )
        ]
    )
    pb_grpc.add_ControlStatusServicer_to_server(
        ControlStatusService(hub, tls=client_certs, admin_names=admin_names, authenticator=authenticator),
        server
    )
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SYNC_SERVICE, STATUS_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if credentials is not None:
        port = server.add_secure_port(addr, credentials.server_credentials())
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    return server, port, health_servicer


def stop_server(server: grpc.Server, hub: PolicyHub, health_servicer: health.HealthServicer,
                grace: float = 5.0) -> None:
    """Graceful stop: report NOT_SERVING, refuse new streams, end the open ones spread over most
    of `grace` (agents reconnect elsewhere a few at a time: balance.py), then stop."""
    health_servicer.enter_graceful_shutdown()
    drain(hub, grace * 0.8)
    hub.close_all(SHUTTING_DOWN)
    server.stop(grace * 0.2).wait()
