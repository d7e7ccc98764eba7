"""FlowObserver.Observe: the control service's flow relay, for authorised readers only.

Flow records name who talks to whom across every tenant, so a reader must prove who it is and be
on the allow list: with mutual TLS, a client certificate whose CN is one of `allowed_names`; in
token mode, a service-account token (checked by TokenReview) whose user is one of `allowed_users`.
The status admins (`--admin-cn`, `--admin-users`) are allowed too. A node's certificate or an agent's
token is not: an agent sees its own flows already. Without TLS there is no caller identity, and
Observe is refused unless the service was started with `allow_unauthenticated` (the node lab on
loopback, where anyone who can reach the port can subscribe as any node anyway).

The servicer runs on the control service's grpc.aio event loop: a reader is woken by the relay
through the loop instead of waiting on a condition, and what can block (a TokenReview, parsing
stored records) runs in the loop's executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import grpc
import grpc.aio

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.control.flow_relay import (
    DEFAULT_MAX_READERS,
    DEFAULT_READER_QUEUE,
    DEFAULT_RING_SIZE,
    FilterError,
    FlowFilter,
    FlowRelay,
    Reader,
    TooManyReaders,
)
from agent.control.identity import IdentityError, TokenAuthenticator, bearer_token, service_account_user
from agent.control.metrics import ControlMetrics

log = logging.getLogger(__name__)

OBSERVE_SERVICE = "podfence.v1.FlowObserver"
_POLL_S = 1.0  # how often a quiet follow stream looks at its reader whatever it was told
# Records per ObserveBatches message: ~50 KB, far below gRPC's 4 MiB; enough that a busy reader
# pays for a message per batch, not per record.
BATCH_RECORDS = 256


def observe_users(names: Iterable[str]) -> frozenset[str]:
    """Allow-list entries as TokenReview usernames: "NAMESPACE/NAME" is a service account (ValueError
    when malformed), anything else a username as it is."""
    return frozenset(service_account_user(name) if "/" in name and ":" not in name else name
                     for name in names)


@dataclass(frozen=True)
class ObserveSettings:
    """The flow relay and who may read it."""

    enabled: bool = True  # False: no relay, no FlowObserver, flows refused (as before issue 24)
    # Certificate CNs or token usernames ("NAMESPACE/NAME" for a service account) that may
    # observe, besides the status admins.
    allowed: tuple[str, ...] = ()
    allow_unauthenticated: bool = False  # without TLS: anyone (the node lab on loopback)
    ring_size: int = DEFAULT_RING_SIZE  # records kept per node for late readers
    reader_queue: int = DEFAULT_READER_QUEUE  # records waiting for one reader before it loses some
    max_readers: int = DEFAULT_MAX_READERS  # Observe streams with follow at once


def build_observe(settings: ObserveSettings, metrics: ControlMetrics,
                  pods_by_ip: Callable[[], Mapping[str, str]], tls: bool, admin_names: Collection[str],
                  authenticator: TokenAuthenticator | None) -> tuple[FlowRelay | None, ObserveAccess | None]:
    """The relay and its access rule for a server (both None when `settings` disable flows)."""
    if not settings.enabled:
        return None, None
    relay = FlowRelay(metrics, pods_by_ip, ring_size=settings.ring_size,
                      reader_queue=settings.reader_queue, max_readers=settings.max_readers)
    access = ObserveAccess(tls=tls, allowed_names=(*admin_names, *settings.allowed),
                           authenticator=authenticator, allowed_users=settings.allowed,
                           allow_unauthenticated=settings.allow_unauthenticated)
    return relay, access


@dataclass(frozen=True)
class _Caller:
    """What the call says about its caller, read on the call's own thread or loop."""

    names: frozenset[str]  # client certificate CNs
    token: str | None
    peer: str


def _caller(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> _Caller:
    names = frozenset(v.decode(errors="replace") for v in context.auth_context().get("x509_common_name", []))
    return _Caller(names, bearer_token(context.invocation_metadata()), context.peer())


class ObserveAccess:
    """Who may observe (see the module docstring)."""

    def __init__(self, tls: bool = False, allowed_names: Collection[str] = (),
                 authenticator: TokenAuthenticator | None = None, allowed_users: Collection[str] = (),
                 allow_unauthenticated: bool = False) -> None:
        self._tls = tls
        self._allowed_names = frozenset(allowed_names)
        self._authenticator = authenticator
        self._allowed_users = observe_users(allowed_users)
        self._allow_unauthenticated = allow_unauthenticated

    def refusal(self, caller: _Caller) -> tuple[grpc.StatusCode, str] | None:
        """Why `caller` may not observe; None when it may. May block (a TokenReview)."""
        refusal = self._refusal(caller)
        if refusal is not None:
            log.warning("refused an Observe call from %s: %s", caller.peer, refusal[1])
        return refusal

    def _refusal(self, caller: _Caller) -> tuple[grpc.StatusCode, str] | None:
        if not self._tls and self._authenticator is None:
            if self._allow_unauthenticated:
                return None
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "observe needs an authenticated caller: this control service runs without TLS")
        if self._tls and caller.names & self._allowed_names:
            return None
        if self._authenticator is not None:
            try:
                who = self._authenticator.caller(caller.token)
            except IdentityError as failure:
                return failure.code, failure.message
            if who.admin or who.user in self._allowed_users:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, f"{who.user} may not observe flows"
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate for {sorted(caller.names) or 'no name'} may not observe flows")


def _request_filter(request: pb.ObserveRequest) -> FlowFilter | tuple[grpc.StatusCode, str]:
    """The request's filter, or why it is refused."""
    if not request.since_seconds >= 0:  # also refuses nan
        return grpc.StatusCode.INVALID_ARGUMENT, "since_seconds must be >= 0"
    try:
        return FlowFilter.from_request(request)
    except FilterError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)


class AsyncFlowObserverService(pb_grpc.FlowObserverServicer):
    """Observe for a grpc.aio server: a follow stream sleeps on an asyncio.Event that the relay
    sets through the loop when a record is queued for it; nothing here blocks the loop."""

    def __init__(self, relay: FlowRelay, access: ObserveAccess) -> None:
        self._relay = relay
        self._access = access

    async def Observe(self, request: pb.ObserveRequest,  # type: ignore[override]
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FlowRecord]:
        """One record per message (readers older than ObserveBatches)."""
        async for batch in self._batches(request, context, limit=1):
            for record in batch:
                yield record

    async def ObserveBatches(self, request: pb.ObserveRequest,  # type: ignore[override]
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ObservedFlows]:
        async for batch in self._batches(request, context, limit=BATCH_RECORDS):
            yield pb.ObservedFlows(records=batch)

    async def _batches(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext,
                       limit: int) -> AsyncIterator[list[pb.FlowRecord]]:
        """The records a reader asked for, in lists of at most `limit`: the stored ones, then (with
        follow) what is queued for it each time it is woken."""
        loop = asyncio.get_running_loop()
        refusal = await loop.run_in_executor(None, self._access.refusal, _caller(context))
        if refusal is not None:
            await context.abort(*refusal)
        flow_filter = _request_filter(request)
        if not isinstance(flow_filter, FlowFilter):
            await context.abort(*flow_filter)
            return
        queued = asyncio.Event()

        def wake() -> None:  # called by the relay from any thread
            loop.call_soon_threadsafe(queued.set)

        try:
            backlog, reader = await loop.run_in_executor(
                None, lambda: self._relay.subscribe(flow_filter, request.since_seconds, request.last,
                                                    request.follow, wake))
        except TooManyReaders as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        try:
            for start in range(0, len(backlog), limit):
                yield backlog[start : start + limit]
            self._relay.sent(len(backlog))
            if reader is not None:
                async for fresh in self._follow(reader, queued, limit):
                    yield fresh
                    self._relay.sent(len(fresh))
        finally:
            if reader is not None:
                self._relay.unsubscribe(reader)

    @staticmethod
    async def _follow(reader: Reader, queued: asyncio.Event,
                      limit: int) -> AsyncIterator[list[pb.FlowRecord]]:
        while not reader.closed:
            queued.clear()  # first clear, then look: a record queued after the look sets it again
            fresh = reader.drain(limit)
            if fresh:
                yield fresh
                continue
            with contextlib.suppress(TimeoutError):  # a look now and then, whatever happens
                await asyncio.wait_for(queued.wait(), _POLL_S)
