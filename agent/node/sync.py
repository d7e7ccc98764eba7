"""The agent's side of NodeSync: keeps this node's desired state in step with the control service.

SyncClient opens one Sync stream, says Hello, replaces its state with each snapshot and patches it
with each delta (whole endpoints, or the allow entries that leave and join an endpoint's lists),
hands the result (a dataplane NodeState) to `apply`, and acks the version only
when `apply` returned. A failed `apply` is nacked with its error; if the reconcile loop programs
that version later after all (a full map freed, an interface that came back), `applied_late`
acks it then, so the control service does not keep showing a stale error. Malformed data from
the server is nacked too, and the stream is reopened so the next snapshot starts from a known state.

With a service-account token (token identity), every stream carries it as `authorization:
Bearer` metadata, read from its file anew for each stream (the kubelet rotates it).

While the control service is unreachable it reconnects with jittered exponential backoff and does
nothing to the kernel: the last programmed state keeps being enforced.

A stream that brings no message within `first_message_timeout` (a replica that accepts streams
but never answers: overloaded, stuck, or hostile) is cancelled and reopened. After that the agent
asks for a heartbeat on idle streams (`heartbeat_interval`); three intervals without any message
mean the replica is wedged (its gRPC core may still answer pings): the stream is reopened.

Replicas may lag behind each other. Every version names the source generation it was built
from; a version older than the one the kernel enforces is never applied: the agent keeps what it
enforces, nacks the version as held (so the replica's `podfence status` shows it), applies
again once that replica catches up, and after `hold_timeout` moves on to the next address. Given several
control addresses ("HOST:PORT,HOST:PORT"), each new stream goes to the next address in turn, so
an agent whose replica stops answering moves to another; every replica serves the same policy,
and a new stream always starts with a snapshot.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from agent.api import podfence_pb2 as pb
from agent.api import podfence_pb2_grpc as pb_grpc
from agent.dataplane.types import NodeState
from agent.node.decode import DecodeCache, MalformedMessage, apply_message
from agent.node.generation import load_generation, save_generation

log = logging.getLogger(__name__)

AGENT_VERSION = "podfence-agent/0.1.0"
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
# A snapshot of a busy node is built and sent in well under a second; this leaves room for a slow
# network or a loaded replica before the agent tries again (or tries the next replica).
DEFAULT_FIRST_MESSAGE_TIMEOUT_S = 20.0
DEFAULT_HEARTBEAT_S = 10.0  # asked of the server; 3 intervals of silence = a wedged replica
DEFAULT_HOLD_TIMEOUT_S = 30.0  # how long to wait for a lagging replica before trying the next
MAX_FLOW_BATCHES_QUEUED = 4  # flow batches a stream holds unsent; more wait in the flow buffer
# The server accepts idle pings every 10 s at most; 20 s finds a dead control service in ~30 s.
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class _StreamBroken(Exception):
    """End this stream and reconnect (after the nack has been sent)."""


def control_targets(text: str | Sequence[str]) -> list[str]:
    """The control addresses of a "HOST:PORT,HOST:PORT" text (or a list of them), in order."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    targets = [part.strip() for part in parts if part.strip()]
    if not targets:
        raise ValueError("no control address given")
    return targets


class SyncClient:
    """Keeps one Sync stream open to the control service and applies what it receives."""

    def __init__(
        self,
        node_name: str,
        target: str | Sequence[str],
        apply: Callable[[NodeState], None],
        credentials: grpc.ChannelCredentials | None = None,
        agent_version: str = AGENT_VERSION,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        first_message_timeout: float = DEFAULT_FIRST_MESSAGE_TIMEOUT_S,
        token: Callable[[], str] | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_S,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
        credentials_factory: Callable[[], grpc.ChannelCredentials] | None = None,
        generation_file: str | Path | None = None,
        rejections: Callable[[], Sequence[str]] = list,
    ) -> None:
        self.node_name = node_name
        # Token identity: read again for every stream, as the kubelet rotates projected tokens.
        self._token = token
        # what the dataplane left out of the version just applied, for its ack
        self._rejections = rejections
        self.targets = control_targets(target)
        self._target_index = 0
        self._first_message_timeout = first_message_timeout
        self._heartbeat_interval = heartbeat_interval
        self._hold_timeout = hold_timeout
        # Source generation of the version the kernel enforces. Kept in a file beside the
        # dataplane's state (/run: it lives as long as the kernel state it describes), so a
        # restarted agent still refuses a lagging replica's first snapshot.
        self._generation_file = Path(generation_file) if generation_file is not None else None
        self.enforced_generation = load_generation(self._generation_file)
        self.held: str | None = None  # why the stream's newest version is not applied (a lagging replica)
        self._held_since: float | None = None
        self.replica = ""  # the replica that sent the last version
        self._last_message = 0.0  # monotonic time of the open stream's last message
        self._heartbeats = threading.Event()  # the open stream's replica sends heartbeats
        self._apply = apply
        self._credentials = credentials
        # TLS files re-read for every new channel, so a rotated CA or certificate is picked up.
        self._credentials_factory = credentials_factory
        self._agent_version = agent_version
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._options = [
            *KEEPALIVE_OPTIONS,
            ("grpc.max_receive_message_length", max_receive_bytes),
            *channel_options,
        ]
        self._connected = threading.Event()
        self.last_applied_version = 0
        # Late acks come from the reconcile thread; the lock keeps each after its version's nack.
        self._ack_lock = threading.Lock()
        self._outgoing: queue.Queue[pb.AgentMessage | None] | None = None  # the open stream's
        self._nacked_version: int | None = None  # nacked because apply failed
        self._late_version: int | None = None  # programmed after apply() had failed
        self.state: NodeState | None = None  # the desired state built from the stream (applied or not)
        # The state check's count and last finding, for `podfence status`; sent to a service that
        # says it takes them (an older one ends a stream on an unknown message), on every stream.
        self._repairs: pb.StateRepairs | None = None
        self._repairs_accepted = False  # by the open stream's service
        # Flow batches (flowbuffer.py) go only to a service that says it takes them, a few at a time.
        self._flows_accepted = False  # by the open stream's service
        self._flow_slots: threading.BoundedSemaphore | None = None  # the open stream's
        self._decode_cache = DecodeCache()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def target(self) -> str:
        """The control address the current (or next) stream uses."""
        return self.targets[self._target_index]

    def run(self, stop: threading.Event) -> None:
        """Blocks until `stop` is set, reconnecting whenever the stream ends."""
        delay = self._backoff_initial
        while not stop.is_set():
            synced = False
            try:
                synced = self._run_stream(stop)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if not stop.is_set():
                    log.warning(
                        "sync stream to %s ended: %s %s",
                        self.target,
                        code,
                        exc.details() if isinstance(exc, grpc.Call) else exc,
                    )
            except _StreamBroken as exc:
                log.warning("resynchronising with %s: %s", self.target, exc)
            finally:
                self._connected.clear()
            if len(self.targets) > 1 and not stop.is_set():
                self._target_index = (self._target_index + 1) % len(self.targets)
                log.info("next stream to control service %s", self.target)
            if synced:
                delay = self._backoff_initial  # a stream that worked restarts the backoff
            # Full jitter keeps many agents from reconnecting in lock-step after a control restart.
            stop.wait(random.uniform(self._backoff_initial / 2, delay))
            delay = min(self._backoff_max, delay * 2)

    def _channel(self) -> grpc.Channel:
        if self._credentials_factory is not None:
            self._credentials = self._credentials_factory()
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=self._options)
        return grpc.insecure_channel(self.target, options=self._options)

    def _run_stream(self, stop: threading.Event) -> bool:
        """One stream's life; returns whether it delivered at least one message."""
        outgoing: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        outgoing.put(
            pb.AgentMessage(
                hello=pb.Hello(
                    node_name=self.node_name,
                    agent_version=self._agent_version,
                    last_applied_version=self.last_applied_version,
                    heartbeat_interval_ms=int(self._heartbeat_interval * 1000),
                    enforced_generation=self.enforced_generation,
                    enforces_tiers=True,  # both dataplanes enforce DirectionPolicy.tiered
                )
            )
        )

        flow_slots = threading.BoundedSemaphore(MAX_FLOW_BATCHES_QUEUED)

        def requests() -> Iterator[pb.AgentMessage]:
            while (message := outgoing.get()) is not None:
                if message.HasField("flows"):
                    flow_slots.release()  # handed to gRPC: the flow buffer may offer the next
                yield message

        with self._ack_lock:
            self._outgoing, self._nacked_version = outgoing, None
            self._repairs_accepted = False
            self._flows_accepted, self._flow_slots = False, flow_slots
        delivered = False
        metadata = None
        if self._token is not None:
            try:
                metadata = [("authorization", f"Bearer {self._token().strip()}")]
            except OSError as exc:
                raise _StreamBroken(f"cannot read the service-account token: {exc}") from exc
        with self._channel() as channel:
            call = pb_grpc.NodeSyncStub(channel).Sync(requests(), metadata=metadata)
            # Heartbeats are expected only from a replica that shows it knows them (an older one,
            # mid-upgrade, sends none: its idle streams must not be taken for wedged).
            ended, answered, self._heartbeats = threading.Event(), threading.Event(), threading.Event()
            verdict: list[str] = []  # why the watcher cancelled the stream
            self._last_message = time.monotonic()
            watcher = threading.Thread(
                target=self._watch_stream, args=(stop, ended, answered, verdict, call), name="sync-watch",
                daemon=True,
            )
            watcher.start()
            broken = False
            try:
                for message in call:
                    answered.set()
                    self._last_message = time.monotonic()
                    if message.HasField("heartbeat") or message.HasField("source"):
                        self._heartbeats.set()
                    if broken or message.HasField("heartbeat"):
                        continue  # draining until the server ends the stream we half-closed
                    if message.accepts_state_repairs and not self._repairs_accepted:
                        self._accept_repairs()
                    if message.accepts_flows and not self._flows_accepted:
                        with self._ack_lock:
                            self._flows_accepted = True
                    self._connected.set()
                    delivered = True
                    self._send_reply(outgoing, self._handle(message))
                    if self.state is None:
                        # Malformed: half-close after the nack so it is delivered, then reconnect
                        # for a snapshot (nothing built on the broken state can be trusted).
                        broken = True
                        outgoing.put(None)
            except grpc.RpcError:
                if stop.is_set():
                    return delivered
                if verdict:
                    raise _StreamBroken(verdict[0]) from None
                raise
            finally:
                self._held_since = None
                ended.set()
                with self._ack_lock:
                    self._outgoing = None
                outgoing.put(None)
        if broken:
            raise _StreamBroken("the control service sent a malformed message")
        return delivered

    def _watch_stream(self, stop: threading.Event, ended: threading.Event, answered: threading.Event,
                      verdict: list[str], call: Any) -> None:
        """Cancels the stream on `stop`, when its first message or a heartbeat is overdue, or when
        its replica has lagged behind the enforced policy for `hold_timeout`."""
        deadline = time.monotonic() + self._first_message_timeout
        silence = 3 * self._heartbeat_interval
        tick = min(0.2, self._heartbeat_interval / 4)
        while not ended.is_set():
            if stop.wait(tick):
                call.cancel()
                return
            now = time.monotonic()
            if not answered.is_set():
                if now >= deadline:
                    verdict.append(f"no snapshot from {self.target} within {self._first_message_timeout:g} s")
            elif self._heartbeats.is_set() and now - self._last_message > silence:
                verdict.append(f"no message or heartbeat from {self.target} for {silence:g} s: the replica "
                               "is wedged")
            elif self._held_since is not None and now - self._held_since > self._hold_timeout:
                verdict.append(f"{self.target} lags behind the enforced policy for {self._hold_timeout:g} s")
            if verdict:
                call.cancel()
                return

    def report_repairs(self, total: int, last: str) -> None:
        """State-check callback: tell the control service (now, and on every later stream)."""
        with self._ack_lock:
            self._repairs = pb.StateRepairs(total=total, last=last)
            if self._outgoing is not None and self._repairs_accepted:
                self._outgoing.put(pb.AgentMessage(state_repairs=self._repairs))

    def offer_flows(self, batch: pb.FlowBatch, wait: float = 0.5) -> bool:
        """Flow buffer callback: queue `batch` on the open stream, waiting up to `wait` while the
        stream holds enough unsent batches already (only the buffer's sender waits, never the
        feed); False (keep it) when there is no stream or its service takes no flows (an older one)."""
        with self._ack_lock:
            slots = self._flow_slots if self._outgoing is not None and self._flows_accepted else None
        if slots is None or not slots.acquire(timeout=wait):
            return False
        with self._ack_lock:
            if self._flow_slots is not slots or self._outgoing is None or not self._flows_accepted:
                return False  # that stream ended meanwhile (its slots go with it)
            self._outgoing.put(pb.AgentMessage(flows=batch))
            return True

    def _accept_repairs(self) -> None:
        with self._ack_lock:
            self._repairs_accepted = True
            if self._outgoing is not None and self._repairs is not None:
                self._outgoing.put(pb.AgentMessage(state_repairs=self._repairs))

    def applied_late(self, version: int) -> None:
        """Reconciler callback: `version`, whose apply failed, is programmed now: ack it (after its
        nack, if that is still to be sent). Without a stream, the next Hello says it."""
        with self._ack_lock:
            self._late_version = version
            if self._nacked_version == version:
                self._ack_late_locked(version)

    def _send_reply(self, outgoing: queue.Queue[pb.AgentMessage | None], reply: pb.AgentMessage) -> None:
        with self._ack_lock:
            outgoing.put(reply)
            applied_failed = (
                not reply.ack.ok and self.state is not None and self.state.version == reply.ack.version
            )
            if not applied_failed:
                return
            self._nacked_version = reply.ack.version
            if self._late_version == reply.ack.version:  # programmed while apply() was giving up
                self._ack_late_locked(reply.ack.version)

    def _ack_late_locked(self, version: int) -> None:
        self._nacked_version = None
        if self.state is None or self.state.version != version:
            return  # a later version has been received since; its own ack speaks for the node
        self.last_applied_version = version
        if self._outgoing is not None:
            self._outgoing.put(self._ack_ok(version))
        log.info("acked version %d: programmed after its nack", version, extra={"version": version})

    def _handle(self, message: pb.ControlMessage) -> pb.AgentMessage:
        """Builds and applies the state `message` describes; returns the ack or nack to send."""
        try:
            state = apply_message(self.state, message, self._decode_cache)
        except MalformedMessage as exc:
            log.error("version %d from the control service is malformed: %s", message.version, exc)
            self.state = None
            return pb.AgentMessage(ack=pb.Ack(version=message.version, ok=False, error=f"malformed: {exc}"))
        self.state = state
        generation = message.source.generation
        self.replica = message.source.replica
        if generation and generation < self.enforced_generation:
            # A lagging replica: what it has is older than what the kernel enforces. Keep that;
            # the stream's state stays built, so a later version that catches up applies whole.
            source = self.replica or self.target
            self.held = (f"held: version {message.version} of replica {source} was built from source "
                         f"generation {generation}, older than the enforced {self.enforced_generation}")
            if self._held_since is None:
                self._held_since = time.monotonic()
                log.warning("%s; keeping the enforced policy", self.held)
            return pb.AgentMessage(ack=pb.Ack(version=message.version, ok=False, error=self.held))
        if self.held is not None:
            log.info("replica %s caught up (generation %d)", self.replica or self.target, generation)
        self.held, self._held_since = None, None
        with self._ack_lock:
            self._late_version = None  # only a success from here on can ack this version late
        try:
            self._apply(state)
        except Exception as exc:  # any failure of the dataplane is reported upstream, never fatal here
            log.error("applying version %d failed: %s", message.version, exc)
            return pb.AgentMessage(ack=pb.Ack(version=message.version, ok=False, error=str(exc) or repr(exc)))
        if generation > self.enforced_generation:
            self.enforced_generation = generation
            save_generation(self._generation_file, generation)
        self.last_applied_version = message.version
        log.debug("applied version %d (%d endpoints)", message.version, len(state.endpoints))
        return self._ack_ok(message.version)

    def _ack_ok(self, version: int) -> pb.AgentMessage:
        return pb.AgentMessage(ack=pb.Ack(version=version, ok=True, rejected_policies=self._rejections()))
