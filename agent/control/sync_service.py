"""NodeSync.Sync on the control service's event loop (grpc.aio): Hello, then a snapshot and
deltas out, acks (and the other AgentMessage kinds) in.

One event loop serves every stream: a stream is two coroutines (this call's sender, and a reader
task), not two threads. With 2,000 agents the thread-per-stream server held 4,021 threads that
convoyed on the GIL and on the hub lock (docs/performance.md); here a policy change wakes the
loop once (`LoopWaker`), the loop encodes and writes each node's delta, and acks are recorded
on the loop under the hub's short state lock (hub.py), never behind a change being resolved.
Work that can block — computing a snapshot (it waits for a change being resolved), a
TokenReview — runs in the loop's executor, never on the loop.

Sync requests are taken as raw bytes and parsed here, so a message that is not an AgentMessage
ends only that stream, with INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL).

After Hello each AgentMessage kind goes to the handler registered for it (`message_handlers`):
"ack" and "state_repairs" here; another kind is one `add_message_handler` call. A kind without a
handler, or a handler raising MalformedMessage, ends that stream with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from agent.api import podfence_pb2 as pb
from agent.control.admission import REASON_HELLO_TIMEOUT, REASON_IDENTITY, StreamAdmission, client_identity
from agent.control.balance import SHUTTING_DOWN
from agent.control.encode import delta_message, snapshot_message
from agent.control.hub import AckError, PolicyHub, StreamClosed, StreamHandle
from agent.control.identity import IdentityError, TokenAuthenticator, bearer_token
from agent.policy.compiled import NodePolicy

log = logging.getLogger(__name__)

MIN_HEARTBEAT_S = 0.1  # an agent cannot make the service spin
# A Kubernetes node name is a DNS-1123 subdomain.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

T = TypeVar("T")
# What to do with one AgentMessage of a kind after Hello, on the event loop: return quickly (or
# return an awaitable); raise MalformedMessage to end the stream as the client's fault.
MessageHandler = Callable[[StreamHandle, pb.AgentMessage], Awaitable[None] | None]


class MalformedMessage(ValueError):
    """An agent's message that makes no sense on its stream: the stream ends with INVALID_ARGUMENT."""


class CallRefused(Exception):
    """Ends a call before its stream is open, with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LoopWaker:
    """Sets asyncio events from any thread. A policy change pushes to every affected stream from
    the source's thread; the loop is woken once for the whole batch (one call_soon_threadsafe),
    not once per stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        self._loop = loop
        self._loop_thread = loop_thread
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    def waker(self, event: asyncio.Event) -> Callable[[], None]:
        return lambda: self.set(event)

    def set(self, event: asyncio.Event) -> None:
        if threading.get_ident() == self._loop_thread:
            event.set()
            return
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:
                return  # a flush is already scheduled and will see this one
        # RuntimeError: the loop is closed, the server has stopped and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            event.set()


class NodeSyncService:
    """NodeSync.Sync: Hello, then a snapshot and deltas out, acks in. Runs on one event loop."""

    def __init__(self, hub: PolicyHub, require_client_cert: bool, admission: StreamAdmission,
                 waker: LoopWaker, hello_timeout_s: float,
                 authenticator: TokenAuthenticator | None = None) -> None:
        self._hub = hub
        self._require_client_cert = require_client_cert
        self._authenticator = authenticator
        self._hello_timeout_s = hello_timeout_s
        self._waker = waker
        self.admission = admission
        self.message_handlers: dict[str, MessageHandler] = {
            "ack": self._ack,
            "state_repairs": self._state_repairs,
        }

    def add_message_handler(self, kind: str, handler: MessageHandler) -> None:
        """Accepts AgentMessages whose `body` is `kind` after Hello, handing them to `handler`."""
        if kind in self.message_handlers or kind == "hello":
            raise ValueError(f"AgentMessage kind {kind!r} already has a handler")
        self.message_handlers[kind] = handler

    async def sync(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        if self._hub.draining:
            # Shutting down: the agent's next address is another replica.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "shutting down: this replica takes no new streams")
        client = client_identity(context, self._require_client_cert)
        refusal = self.admission.enter(client)
        if refusal is not None:
            log.warning("refused a Sync stream from %s (%s): %s", context.peer(), client, refusal)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        pending = True  # whether this stream still counts as awaiting Hello
        handle: StreamHandle | None = None
        reader: asyncio.Task[None] | None = None
        try:
            try:
                bound_node = await self._bound_node(context)
                hello = await self._await_hello(requests, context, bound_node)
            except CallRefused as failure:
                log.warning("refused a Sync stream from %s: %s", context.peer(), failure.details)
                await context.abort(failure.code, failure.details)
            self.admission.greeted(client)
            pending = False
            ready = asyncio.Event()
            handle = await off_loop(self._hub.open_stream, hello.node_name, hello.last_applied_version,
                                     self._waker.waker(ready),
                                     undo=lambda opened: self._hub.close_stream(opened, "the stream ended"))
            reader = asyncio.create_task(self._read_messages(requests, handle),
                                         name=f"sync-reader {hello.node_name}")
            await self._send(handle, context, ready, _heartbeat_interval(hello))
        finally:
            if reader is not None:
                reader.cancel()
            if handle is not None:
                self._hub.close_stream(handle, "the stream ended")
            self.admission.leave(client, pending=pending)

    async def _bound_node(self, context: grpc.aio.ServicerContext) -> str | None:
        """Token mode: the node of the caller's agent pod (a TokenReview, off the loop)."""
        if self._authenticator is None:
            return None
        token = bearer_token(context.invocation_metadata())
        try:
            return await off_loop(self._authenticator.agent_node, token)
        except IdentityError as failure:
            self._hub.metrics.streams_refused_total.labels(REASON_IDENTITY).inc()
            raise CallRefused(failure.code, failure.message) from failure

    async def _await_hello(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                           bound_node: str | None) -> pb.Hello:
        timeout = self._hello_timeout_s
        try:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for drops a cancellation (the
            # client went away) that arrives as the Hello does, and the stream would go on.
            async with asyncio.timeout(timeout):
                raw = await anext(requests, None)
        except TimeoutError:
            self._hub.metrics.streams_refused_total.labels(REASON_HELLO_TIMEOUT).inc()
            raise CallRefused(grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {timeout:g} s") from None
        if raw is None:
            raise CallRefused(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before Hello")
        try:
            message = _parse(raw)
        except MalformedMessage as exc:
            raise CallRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if message.WhichOneof("body") != "hello":
            raise CallRefused(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        node = message.hello.node_name
        if len(node) > 253 or not _NODE_NAME.match(node):
            raise CallRefused(grpc.StatusCode.INVALID_ARGUMENT, f"invalid node name {node!r}")
        if self._authenticator is not None:
            if node != bound_node:
                raise CallRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the token of an agent pod on node {bound_node!r} may not subscribe as node {node!r}",
                )
        elif self._require_client_cert:
            names = common_names(context)
            if node not in names:
                raise CallRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client certificate for {names or 'no name'} may not subscribe as node {node!r}",
                )
        return message.hello

    async def _read_messages(self, requests: AsyncIterator[bytes], handle: StreamHandle) -> None:
        try:
            async for raw in requests:
                message = _parse(raw)
                handler = self.message_handlers.get(message.WhichOneof("body") or "")
                if handler is None:
                    kinds = ", ".join(sorted(self.message_handlers))
                    raise MalformedMessage(f"after Hello only these messages are allowed: {kinds}")
                result = handler(handle, message)
                if inspect.isawaitable(result):
                    await result
        except MalformedMessage as failure:
            log.warning("node %s sent a malformed message: %s", handle.node, failure)
            handle.close(str(failure), client_error=True)
        except (grpc.RpcError, grpc.aio.AbortError):
            pass  # the call is over (the client left, or the sender ended it): nothing to record
        except Exception:  # a bug here must end this stream alone, and say so
            log.exception("node %s: reading its stream failed", handle.node)
            handle.close("internal error reading the stream")
        else:
            handle.close("the agent closed its side of the stream")

    def _ack(self, handle: StreamHandle, message: pb.AgentMessage) -> None:
        ack = message.ack
        try:
            self._hub.ack(handle, ack.version, ack.ok, ack.error, tuple(ack.rejected_policies))
        except AckError as exc:
            raise MalformedMessage(str(exc)) from exc

    def _state_repairs(self, handle: StreamHandle, message: pb.AgentMessage) -> None:
        self._hub.state_repairs(handle, message.state_repairs.total, message.state_repairs.last)

    async def _send(self, handle: StreamHandle, context: grpc.aio.ServicerContext, ready: asyncio.Event,
                    heartbeat_s: float | None) -> None:
        last_sent = time.monotonic()
        while True:
            ready.clear()  # before looking at the queue: a push after the look sets it again
            try:
                item = handle.next(timeout=0)
            except StreamClosed as closed:
                code = _closing_code(closed)
                if code is not None:
                    await context.abort(code, closed.reason)
                return
            if item is None:
                if heartbeat_s is None:
                    await ready.wait()
                    continue
                idle = time.monotonic() - last_sent
                if idle >= heartbeat_s:
                    last_sent = time.monotonic()
                    await context.write(pb.ControlMessage(
                        heartbeat=pb.Heartbeat(sent_unix_ms=time.time_ns() // 1_000_000)))
                    continue
                # A timer rather than wait_for: no task per wait, and 2,000 streams wait at once.
                timer = asyncio.get_running_loop().call_later(heartbeat_s - idle, ready.set)
                try:
                    await ready.wait()
                finally:
                    timer.cancel()
                continue
            if item.snapshot or handle.last_sent is None:
                # Off the loop: a busy node's snapshot (up to max_send_bytes) takes long enough
                # to encode that every other stream, and status, would wait for it.
                message, seconds = await off_loop(_timed_snapshot, item.version, item.policy)
                self._hub.metrics.snapshot_build_seconds.observe(item.build_seconds + seconds)
            else:
                message = delta_message(item.version, handle.last_sent, item.policy)
            handle.mark_sent(item.version, item.policy)
            message.source.CopyFrom(pb.SourceState(
                generation=item.source.generation, digest=item.source.digest, replica=self._hub.replica
            ))
            message.accepts_state_repairs = True
            message.accepts_flows = "flows" in self.message_handlers
            last_sent = time.monotonic()
            await context.write(message)


def _timed_snapshot(version: int, policy: NodePolicy) -> tuple[pb.ControlMessage, float]:
    """The snapshot message, and the seconds it took to encode (not those it waited for a thread)."""
    started = time.perf_counter()
    message = snapshot_message(version, policy)
    return message, time.perf_counter() - started


def _closing_code(closed: StreamClosed) -> grpc.StatusCode | None:
    """The status a closed stream ends with; None: OK (the stream simply ended)."""
    if closed.client_error:
        return grpc.StatusCode.INVALID_ARGUMENT
    if closed.reason.startswith("superseded"):
        return grpc.StatusCode.CANCELLED
    if closed.reason.startswith((SHUTTING_DOWN, "rebalancing")):
        return grpc.StatusCode.UNAVAILABLE
    return None


async def off_loop(function: Callable[..., T], *args: object,
                    undo: Callable[[T], None] | None = None) -> T:
    """`function(*args)` in the loop's executor. If the call is cancelled meanwhile (the client
    went away), `undo` is applied to the result once it arrives, so nothing stays registered."""
    future = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if undo is not None:
            def after(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    undo(done.result())
            future.add_done_callback(after)
        raise


def _heartbeat_interval(hello: pb.Hello) -> float | None:
    """Seconds between heartbeats on an idle stream, as the agent asked (None: it did not)."""
    if not hello.heartbeat_interval_ms:
        return None
    return max(MIN_HEARTBEAT_S, hello.heartbeat_interval_ms / 1000)


def common_names(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> list[str]:
    return [v.decode(errors="replace") for v in context.auth_context().get("x509_common_name", [])]


def _parse(raw: bytes) -> pb.AgentMessage:
    try:
        return pb.AgentMessage.FromString(raw)
    except DecodeError as exc:
        raise MalformedMessage(f"not an AgentMessage: {exc}") from exc
