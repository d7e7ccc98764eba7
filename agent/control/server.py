"""The control service's gRPC server: NodeSync.Sync streams (sync_service.py), ControlStatus,
and gRPC health, all served by grpc.aio on one event loop in a thread of its own (`ControlServer`).

Why an event loop: a thread-per-stream server held two threads per agent (4,021 threads for
2,000 agents) that convoyed on the GIL, and a policy change to 2,000 nodes took 2.5 s of CPU
(docs/performance.md). The rest of the service (sources, balancer, drain, main) stays threaded
and drives the server through `ControlServer`'s blocking start/stop.

Messages above the receive limit are refused by grpc itself with RESOURCE_EXHAUSTED.

Which node a stream may speak for comes from one of two identities: with mutual TLS alone it is
the client certificate's common name; in token mode (identity.py) it is the node of the agent pod
whose service-account token the call carries, found by TokenReview and the pod cache. Either way
an agent of node A cannot ask for node B's policy (PERMISSION_DENIED).

Streams are admitted within bounds (admission.py): Hello within a deadline, a few streams per
client awaiting Hello, a total below the server's call limit. GetStatus answers with mutual TLS only what
the caller may see: a node's certificate sees its own node's entry; a certificate whose CN is one
of `admin_names` sees every node and the source's errors. In token mode an agent's token sees its
own node's entry and an admin user's token everything. Without TLS there is no caller identity,
and anyone who can reach the port can subscribe as any node anyway: status shows everything.

Every version sent carries the source state it was built from (hub.py), and an agent that asks
for heartbeats gets one on an idle stream, so it can tell a wedged replica from a quiet one.

Adding a service: write its servicer with `async def` methods and add it in `_build` next to
ControlStatus (the generated `add_..._to_server` works on the aio server).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Collection
from concurrent import futures
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.admission import StreamAdmission
from agent.control.balance import SHUTTING_DOWN, drain
from agent.control.hub import HubStatus, PolicyHub, StreamHandle
from agent.control.identity import IdentityError, TokenAuthenticator, bearer_token
from agent.control.metrics import ControlMetrics
from agent.control.observe_service import (
    OBSERVE_SERVICE,
    AsyncFlowObserverService,
    ObserveSettings,
    build_observe,
)
from agent.control.sync_service import LoopWaker, NodeSyncService, common_names, off_loop
from agent.control.tls_files import TlsFiles as TlsFiles  # re-exported: older imports

log = logging.getLogger(__name__)

DEFAULT_ADMIN_NAME = "podfence-admin"  # the CN of an operator's certificate for `podfence status`
SYNC_SERVICE = "podfence.v1.NodeSync"
STATUS_SERVICE = "podfence.v1.ControlStatus"
# Blocking work of the event loop (snapshots that wait for a change being resolved, TokenReviews).
BLOCKING_THREADS = 16
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """Transport settings; the defaults suit a cluster of a few thousand nodes."""

    # Largest message sent (a snapshot of a busy node) and largest accepted (agents send tiny ones).
    max_send_bytes: int = 64 * 1024 * 1024
    max_receive_bytes: int = 4 * 1024 * 1024
    # Calls served at once (the name is from when each held a thread). Calls beyond it are
    # refused at once (never queued behind idle streams); Sync streams stop `reserved_workers`
    # short of it, so GetStatus and health checks always get in.
    max_workers: int = 2048
    reserved_workers: int = 48
    # A stream must say Hello this soon; a client may have this many streams awaiting Hello.
    hello_timeout_s: float = 10.0
    max_pending_per_client: int = 8

    @property
    def max_streams(self) -> int:
        """Sync streams at most: the call limit less its reserve (at most a quarter of a small one)."""
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


def stream_admission(settings: ServerSettings, metrics: ControlMetrics) -> StreamAdmission:
    """The admission bounds of `settings`, counting refusals in `metrics`."""
    return StreamAdmission(
        max_streams=settings.max_streams,
        max_pending_per_client=settings.max_pending_per_client,
        refused=lambda reason: metrics.streams_refused_total.labels(reason).inc(),
    )


class ControlStatusService(pb_grpc.ControlStatusServicer):
    """GetStatus, scoped to the caller with mutual TLS (see the module docstring)."""

    def __init__(self, hub: PolicyHub, tls: bool = False, admin_names: Collection[str] = (),
                 authenticator: TokenAuthenticator | None = None) -> None:
        self._hub = hub
        self._tls = tls
        self._admin_names = frozenset(admin_names)
        self._authenticator = authenticator

    async def GetStatus(self, request: pb.StatusRequest,
                        context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        status = await self._visible(self._hub.status(), context)
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

    async def _visible(self, status: HubStatus, context: grpc.aio.ServicerContext) -> HubStatus:
        if not self._tls and self._authenticator is None:
            return status
        names = set(common_names(context)) if self._tls else set()
        if names & self._admin_names:
            return status
        if self._authenticator is not None:
            # Token mode: an admin user's token sees everything, an agent's token its own node.
            try:
                token = bearer_token(context.invocation_metadata())
                caller = await off_loop(self._authenticator.caller, token)  # a TokenReview
            except IdentityError as failure:
                await context.abort(failure.code, failure.message)
            if caller.admin:
                return status
            names = {caller.node} if caller.node else set()
        # A node's certificate: its own entry only. Other nodes' errors and the source's errors
        # name other tenants' objects, and a compromised node has no business reading them.
        own = {node: record for node, record in status.nodes.items() if node in names}
        return replace(status, nodes=own, source_errors=())


class ControlServer:
    """The grpc.aio server and its event loop, on a thread of their own, driven by blocking calls
    from the rest of the (threaded) control service."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(
            futures.ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="control-blocking"))
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="grpc-aio", daemon=True)
        self._thread.start()
        started.wait()
        assert self._thread.ident is not None
        self.waker = LoopWaker(self._loop, self._thread.ident)
        self.server: grpc.aio.Server | None = None
        self._stopped = threading.Event()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    def call(self, coroutine: Awaitable[T]) -> T:
        """Runs `coroutine` on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]

    def start(self) -> None:
        assert self.server is not None
        self.call(self.server.start())

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, grace: float | None) -> threading.Event:
        """Ends every call (after `grace` seconds) and the loop; returns an event already set,
        so that `server.stop(grace).wait()` reads as it does for a threaded grpc server."""
        if not self._stopped.is_set():
            if self.server is not None:
                self.call(self.server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._stopped.set()
        return self._stopped


def create_server(
    addr: str,
    hub: PolicyHub,
    credentials: ServerTls | None = None,
    settings: ServerSettings | None = None,
    admin_names: Collection[str] = (DEFAULT_ADMIN_NAME,),
    admission: StreamAdmission | None = None,
    authenticator: TokenAuthenticator | None = None,
    observe: ObserveSettings | None = None,
) -> tuple[ControlServer, int, health_aio.HealthServicer]:
    """Builds (not starts) the server bound to `addr` ("host:0" picks a port); returns its port too.
    With client certificates, those whose CN is in `admin_names` see all of GetStatus. With an
    `authenticator` (token mode) streams are bound to nodes by service-account tokens instead of
    certificate names; client certificates then only secure the transport. `observe` sets up the
    flow relay (ObserveSettings(enabled=False): none, as before issue 24)."""
    settings = settings or ServerSettings()
    client_certs = credentials is not None and credentials.require_client_auth
    if credentials is not None and not client_certs and authenticator is None:
        raise ValueError("without a token authenticator the node identity needs client certificates (a CA)")
    control = ControlServer()
    try:
        port, health_servicer = control.call(_build(
            control, addr, hub, credentials, settings, admin_names,
            admission or stream_admission(settings, hub.metrics), authenticator, client_certs,
            observe or ObserveSettings(),
        ))
    except BaseException:
        control.stop(0)
        raise
    return control, port, health_servicer


async def _build(control: ControlServer, addr: str, hub: PolicyHub, credentials: ServerTls | None,
                 settings: ServerSettings, admin_names: Collection[str], admission: StreamAdmission,
                 authenticator: TokenAuthenticator | None, client_certs: bool,
                 observe: ObserveSettings) -> tuple[int, health_aio.HealthServicer]:
    """Runs on the server's loop: grpc.aio binds a server to the loop it is created on."""
    options = [
        ("grpc.max_send_message_length", settings.max_send_bytes),
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", settings.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    # A call beyond the limit is refused (RESOURCE_EXHAUSTED), never queued behind streams that
    # may stay open for hours.
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.max_workers)
    control.server = server
    sync = NodeSyncService(hub, require_client_cert=client_certs, admission=admission, waker=control.waker,
                           hello_timeout_s=settings.hello_timeout_s, authenticator=authenticator)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(SYNC_SERVICE, {
            # No request deserializer: raw bytes, parsed by NodeSyncService itself.
            "Sync": grpc.stream_stream_rpc_method_handler(
                sync.sync, response_serializer=pb.ControlMessage.SerializeToString),
        }),
    ])
    pb_grpc.add_ControlStatusServicer_to_server(
        ControlStatusService(hub, tls=client_certs, admin_names=admin_names, authenticator=authenticator),
        server,
    )
    relay, access = build_observe(observe, hub.metrics, hub.pod_names_by_ip, client_certs, admin_names,
                                  authenticator)
    if relay is not None and access is not None:
        flows = relay

        async def relay_flows(handle: StreamHandle, message: pb.AgentMessage) -> None:
            # off the loop: naming the records' pods may wait for the resolver
            await off_loop(flows.handle_message, handle, message)

        sync.add_message_handler("flows", relay_flows)
        pb_grpc.add_FlowObserverServicer_to_server(AsyncFlowObserverService(relay, access), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SYNC_SERVICE, STATUS_SERVICE, *((OBSERVE_SERVICE,) if relay is not None else ())):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if credentials is not None:
        port = server.add_secure_port(addr, credentials.server_credentials())
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    return port, health_servicer


def stop_server(server: ControlServer, hub: PolicyHub, health_servicer: health_aio.HealthServicer,
                grace: float = 5.0) -> None:
    """Graceful stop: report NOT_SERVING, refuse new streams, end the open ones spread over most
    of `grace` (agents reconnect elsewhere a few at a time: balance.py), then stop. Stopping a
    stopped server does nothing."""
    if server.stopped:
        return
    server.call(health_servicer.enter_graceful_shutdown())
    drain(hub, grace * 0.8)
    hub.close_all(SHUTTING_DOWN)
    server.stop(grace * 0.2).wait()
