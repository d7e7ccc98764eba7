"""The control service's core: one policy version counter, per-node streams, per-node status.

Sources mutate the Resolver inside `PolicyHub.change()`; leaving that block bumps the global
version and queues the new NodePolicy on the stream of every node whose policy actually changed
(the Resolver tells which nodes are dirty). Each stream's queue is bounded: a stream that falls
too far behind drops its queue and gets a fresh snapshot instead. The gRPC layer (server.py) only
moves messages between a StreamHandle and the wire.

Status semantics: a node's `applied_version` is the last version it acknowledged, except that a
connected node that has acknowledged its latest change is reported at the current version — the
versions since then did not change what that node enforces, so it is in sync with them.
A node that stays disconnected longer than `forget_after_s` is forgotten (status, metrics), so
a cluster that replaces its nodes does not grow this replica's node list forever.

Replicas: versions are this replica's own counter, so each version also carries the source
state it was built from (`SourceMark`: a generation that grows with the source, the same on every
replica that read the same source, and a digest). Sources note it inside `change()`. An agent
compares generations across replicas and never enforces an older one (agent/node/sync.py).

Two locks, so that the gRPC event loop never waits on the resolver: `_resolver_lock` is held
while a source mutates the resolver and while node policies are computed from it (a large
change holds it for a second or more); `_state_lock` guards the version, the streams and the
records, and is only ever held for a few dictionary operations. Acks, status and stream closes
take the state lock alone, so they go on while a change is being resolved.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.control.freshness import Freshness
from agent.control.metrics import ControlMetrics
from agent.model.objects import Pod
from agent.policy.compiled import NodePolicy
from agent.policy.state import ClusterState

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 32  # queued versions per stream before it is reset to a snapshot
DEFAULT_FORGET_AFTER_S = 3600.0  # a disconnected node stays in status and metrics this long
_REMEMBERED_VERSIONS = 4096  # per stream, to reject acks of versions it was never sent


class PolicyResolver(Protocol):
    """What the hub needs of agent.policy.resolver.Resolver."""

    def upsert(self, obj: Any) -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...
    def replace_all(self, objs: Any) -> None: ...
    def node_policy(self, node: str) -> NodePolicy: ...
    def take_dirty_nodes(self) -> set[str]: ...
    @property
    def state(self) -> ClusterState: ...


class StreamClosed(Exception):
    """Raised to the stream's sender when it must end; carries why and whether it is the client's fault."""

    def __init__(self, reason: str, client_error: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.client_error = client_error


class AckError(ValueError):
    """An ack that does not match anything this stream was sent (a malformed client message)."""


@dataclass(frozen=True)
class SourceMark:
    """The source state a version was built from (proto SourceState)."""

    generation: int = 0  # grows with the source; 0: not known
    digest: str = ""


@dataclass
class Outgoing:
    """One message to send: the node's whole policy at `version`, as a snapshot or as a delta."""

    version: int
    policy: NodePolicy
    snapshot: bool
    build_seconds: float = 0.0  # time already spent computing `policy`, for the snapshot histogram
    source: SourceMark = SourceMark()


@dataclass
class NodeRecord:
    acked_version: int = 0
    connected: bool = False
    last_error: str | None = None
    # policies the node's last ack says it left out (its maps cannot hold them): "ns/name: why"
    rejected_policies: tuple[str, ...] = ()
    latest_change: int = 0  # version of the newest message queued for this node
    disconnected_at: float | None = None  # hub clock of the last disconnect, None while connected
    state_repairs: int = 0  # kernel state its agent put back since it started (repair.py)
    last_repair: str = ""


class StreamHandle:
    """One node's open Sync stream: a bounded queue of versions to send, filled by the hub."""

    def __init__(self, hub: PolicyHub, node: str, stream_id: int, max_pending: int,
                 wake: Callable[[], None] | None = None) -> None:
        self.hub = hub
        self.node = node
        self.stream_id = stream_id
        self._max_pending = max_pending
        # Called (from any thread) after a push or close, for a sender that does not block in
        # next(): the gRPC event loop (server.py) waits on its own event instead.
        self._wake = wake
        self._cond = threading.Condition()
        self._queue: deque[Outgoing] = deque()
        self._closed: StreamClosed | None = None
        self._sent: set[int] = set()
        self._sent_order: deque[int] = deque()
        self.last_sent: NodePolicy | None = None  # what the agent has, if it applied everything
        self.queued_policy: NodePolicy | None = None  # newest policy queued (hub side, under hub lock)
        self.applied_once = False  # the agent acked a version on this stream (hub side, under hub lock)

    def push(self, item: Outgoing) -> bool:
        """Queue a version; returns False when the stream was too far behind and got reset instead."""
        with self._cond:
            if self._closed is not None:
                return True
            reset = len(self._queue) >= self._max_pending
            if reset:
                self._queue.clear()
                item = Outgoing(item.version, item.policy, snapshot=True, build_seconds=item.build_seconds,
                                source=item.source)
            self._queue.append(item)
            self._cond.notify()
        if self._wake is not None:
            self._wake()
        return not reset

    def next(self, timeout: float | None = None) -> Outgoing | None:
        """The next message to send; None on timeout; raises StreamClosed once closed."""
        with self._cond:
            if not self._queue and self._closed is None:
                self._cond.wait(timeout)
            if self._closed is not None:
                raise self._closed
            return self._queue.popleft() if self._queue else None

    def mark_sent(self, version: int, policy: NodePolicy) -> None:
        with self._cond:
            self.last_sent = policy
            self._sent.add(version)
            self._sent_order.append(version)
            if len(self._sent_order) > _REMEMBERED_VERSIONS:
                self._sent.discard(self._sent_order.popleft())

    def was_sent(self, version: int) -> bool:
        with self._cond:
            return version in self._sent

    def close(self, reason: str, client_error: bool = False) -> None:
        """Ends the stream (idempotent: the first reason wins)."""
        with self._cond:
            if self._closed is None:
                self._closed = StreamClosed(reason, client_error)
            self._cond.notify_all()
        if self._wake is not None:
            self._wake()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed is not None


@dataclass(frozen=True)
class SourceProblem:
    """An invalid object or unreadable file of the source, as `podfence status` shows it."""

    object: str | None  # "Kind namespace/name", None when no object could be named
    source: str  # the file, or "kubernetes"
    error: str
    last_valid_in_force: bool  # the object's (file's) last valid form is still what is enforced


@dataclass
class HubStatus:
    version: int
    nodes: dict[str, NodeRecord] = field(default_factory=dict)  # copies, with the reported applied version
    source_errors: tuple[SourceProblem, ...] = ()
    source: SourceMark = SourceMark()
    streams: int = 0
    draining: bool = False
    source_freshness: Freshness | None = None  # None: the source has no remote end (a folder)


class PolicyHub:
    """Owns the Resolver, the version counter, the open streams and the per-node records."""

    def __init__(
        self,
        resolver: PolicyResolver,
        metrics: ControlMetrics | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        initial_version: int | None = None,
        forget_after_s: float = DEFAULT_FORGET_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
        replica: str | None = None,
    ) -> None:
        self._resolver = resolver
        self.metrics = metrics if metrics is not None else ControlMetrics()
        self._max_pending = max_pending
        self._forget_after_s = forget_after_s
        self._clock = clock
        # Wall-clock milliseconds as the starting point keep versions growing across restarts of
        # this service, so a status reader never sees the version go backwards after a restart.
        self._version = initial_version if initial_version is not None else time.time_ns() // 1_000_000
        self._resolver_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._streams: dict[str, StreamHandle] = {}
        self._records: dict[str, NodeRecord] = {}
        self._source_problems: tuple[SourceProblem, ...] = ()
        self._next_stream_id = 0
        self._source = SourceMark()
        # The pod's name in a Deployment (HOSTNAME), so `podfence status` can say which replica.
        self.replica = replica or os.environ.get("HOSTNAME") or socket.gethostname()
        self.draining = False
        self.metrics.watch_hub(self._metric_view)
        self._freshness: Callable[[], Freshness] | None = None
        # Called with a node's name when its agent acks its first version on a stream (the
        # control service then lifts the node's not-ready taint); must not block.
        self.on_node_applied: Callable[[str], None] | None = None
        self._pods_by_ip: tuple[int, dict[str, str]] | None = None  # (version, names)

    def set_freshness(self, read: Callable[[], Freshness]) -> None:
        """How recently the source heard from the API server, for `podfence status` and the metrics."""
        self._freshness = read
        self.metrics.watch_freshness(read)

    # --- sources ---------------------------------------------------------------------------------

    @contextmanager
    def change(self) -> Iterator[PolicyResolver]:
        """Mutate the resolver inside the block; on exit, publish one new version to affected nodes."""
        with self._resolver_lock:
            yield self._resolver
            self._publish()

    def _publish(self) -> None:
        """Called with the resolver lock held (so no stream opens meanwhile)."""
        dirty = self._resolver.take_dirty_nodes()
        with self._state_lock:
            self._version += 1
            version, source = self._version, self._source
            streams = [stream for node in dirty if (stream := self._streams.get(node)) is not None]
        # Nodes without a stream get a snapshot when they connect. The policies are computed
        # without the state lock: acks and status go on meanwhile.
        queued = [(stream, self._resolver.node_policy(stream.node)) for stream in streams]
        changed = 0
        with self._state_lock:
            for stream, policy in queued:
                if self._streams.get(stream.node) is not stream or policy == stream.queued_policy:
                    continue  # closed meanwhile, or nothing it enforces changed
                stream.queued_policy = policy
                self._records[stream.node].latest_change = version
                changed += 1
                if not stream.push(Outgoing(version, policy, snapshot=False, source=source)):
                    self.metrics.streams_reset_total.inc()
                    log.warning("node %s fell %d versions behind; resetting it to a snapshot", stream.node,
                                self._max_pending)
        log.info("policy version %d: %d connected node(s) changed", version, changed)

    def note_source(self, generation: int, digest: str) -> None:
        """The source state the resolver holds now; call inside `change()` so the version it
        publishes carries it. The generation never goes back (a re-list may report an older one)."""
        with self._state_lock:
            self._source = SourceMark(max(generation, self._source.generation), digest)

    @property
    def source(self) -> SourceMark:
        with self._state_lock:
            return self._source

    def set_source_problems(self, problems: list[SourceProblem]) -> None:
        """The source's current problems (replacing the previous list); also sets the gauges."""
        ordered = tuple(sorted(problems, key=lambda p: (p.source, p.object or "", p.error)))
        with self._state_lock:
            self._source_problems = ordered
        self.metrics.invalid_objects.set(sum(1 for p in ordered if p.object is not None))
        self.metrics.last_valid_objects.set(
            sum(1 for p in ordered if p.object is not None and p.last_valid_in_force)
        )

    @property
    def version(self) -> int:
        with self._state_lock:
            return self._version

    def node_count(self) -> int:
        """Nodes that the pod cache has pods on (each runs an agent): for a replica's share."""
        with self._resolver_lock:
            return len({pod.node_name for pod in self._resolver.state.pods.values() if pod.node_name})

    def find_pod(self, namespace: str, name: str) -> Pod | None:
        """A live pod of the source (the pod cache token identity binds agents by)."""
        with self._resolver_lock:
            return self._resolver.state.pods.get(f"{namespace}/{name}")

    def pod_names_by_ip(self) -> dict[str, str]:
        """IP -> "namespace/name" of the live pod holding it, for naming flow records' peers;
        rebuilt at most once per version (the flow relay asks once per batch)."""
        cached = self._pods_by_ip
        if cached is not None and cached[0] == self._version:
            return cached[1]
        with self._resolver_lock:
            names = {ip: pod.key for ip, pod in self._resolver.state.pod_by_ip().items()}
            self._pods_by_ip = (self._version, names)
            return names

    # --- streams ---------------------------------------------------------------------------------

    def open_stream(self, node: str, last_applied_version: int,
                    wake: Callable[[], None] | None = None) -> StreamHandle:
        """Registers a node's new stream (closing an older one) and queues its snapshot; `wake`
        is called whenever the stream has something to send or is closed. Computes the node's
        policy: it may wait for a change being resolved, so not on an event loop."""
        with self._resolver_lock:
            started = time.perf_counter()
            policy = self._resolver.node_policy(node)
            build_seconds = time.perf_counter() - started
            with self._state_lock:
                return self._register_locked(node, last_applied_version, policy, build_seconds, wake)

    def _register_locked(self, node: str, last_applied_version: int, policy: NodePolicy,
                         build_seconds: float, wake: Callable[[], None] | None) -> StreamHandle:
        self._next_stream_id += 1
        handle = StreamHandle(self, node, self._next_stream_id, self._max_pending, wake)
        older = self._streams.get(node)
        if older is not None:
            older.close(f"superseded by a newer stream for node {node}")
            log.info("node %s: newer stream replaces stream %d", node, older.stream_id)
        self._streams[node] = handle
        record = self._records.setdefault(node, NodeRecord())
        record.connected = True
        record.disconnected_at = None
        # The agent says again what it repaired (its count since it started) on each stream;
        # a restarted agent's count starts over.
        record.state_repairs, record.last_repair = 0, ""
        # The agent's own number may come from another replica; whatever it says, it has not
        # acked the snapshot queued below yet, so it stays below that snapshot's version.
        record.acked_version = min(last_applied_version, self._version - 1)
        handle.queued_policy = policy
        record.latest_change = self._version
        handle.push(Outgoing(self._version, policy, snapshot=True,
                             build_seconds=build_seconds, source=self._source))
        log.info("node %s connected (stream %d), snapshot at version %d", node, handle.stream_id,
                 self._version)
        return handle

    def close_stream(self, handle: StreamHandle, reason: str) -> None:
        handle.close(reason)
        with self._state_lock:
            if self._streams.get(handle.node) is handle:
                del self._streams[handle.node]
                record = self._records[handle.node]
                record.connected = False
                record.disconnected_at = self._clock()
                log.info("node %s disconnected: %s", handle.node, reason)

    def ack(
        self, handle: StreamHandle, version: int, ok: bool, error: str, rejected: Sequence[str] = ()
    ) -> None:
        """Records an agent's ack/nack; raises AckError for a version this stream was never sent."""
        if not handle.was_sent(version):
            raise AckError(f"ack for version {version}, which this stream was never sent")
        first_apply = False
        with self._state_lock:
            if self._streams.get(handle.node) is not handle:
                return  # a superseded stream's late ack says nothing about the node now
            record = self._records[handle.node]
            if ok:
                if version >= record.acked_version:
                    if tuple(rejected) != record.rejected_policies:
                        for rejection in rejected:
                            log.warning("node %s left out policy %s", handle.node, rejection)
                    record.rejected_policies = tuple(rejected)
                record.acked_version = max(record.acked_version, version)
                record.last_error = None
                first_apply, handle.applied_once = not handle.applied_once, True
            else:
                record.last_error = error or "unspecified dataplane error"
                log.warning("node %s failed to apply version %d: %s", handle.node, version,
                            record.last_error)
        if first_apply and self.on_node_applied is not None:
            self.on_node_applied(handle.node)

    def state_repairs(self, handle: StreamHandle, total: int, last: str) -> None:
        """Records what the node's agent reported putting back in its kernel state."""
        with self._state_lock:
            if self._streams.get(handle.node) is not handle:
                return
            record = self._records[handle.node]
            record.state_repairs, record.last_repair = total, last[:500]  # bounded: status output
        log.info("node %s repaired its kernel state (%d so far): %s", handle.node, total, last[:500])

    def close_all(self, reason: str) -> None:
        for stream in self.open_streams():
            stream.close(reason)

    def open_streams(self) -> list[StreamHandle]:
        """The current stream of every connected node, oldest first (not those already told to end)."""
        with self._state_lock:
            streams = list(self._streams.values())
        return sorted((h for h in streams if not h.closed), key=lambda handle: handle.stream_id)

    # --- status ----------------------------------------------------------------------------------

    def status(self) -> HubStatus:
        freshness = self._freshness() if self._freshness is not None else None
        with self._state_lock:
            self._forget_long_gone_locked()
            nodes = {}
            for node, record in self._records.items():
                in_sync = record.connected and record.last_error is None and (
                    record.acked_version >= record.latest_change
                )
                # a copy, so that a field added to NodeRecord reaches status without being named here
                acked = self._version if in_sync else record.acked_version
                nodes[node] = replace(record, acked_version=acked)
            return HubStatus(self._version, nodes, self._source_problems, self._source,
                             len(self._streams), self.draining, freshness)

    def _forget_long_gone_locked(self) -> None:
        horizon = self._clock() - self._forget_after_s
        for node, record in list(self._records.items()):
            gone = record.disconnected_at
            if gone is not None and gone < horizon and node not in self._streams:
                del self._records[node]
                log.info("node %s forgotten: disconnected for more than %.0f s", node, self._forget_after_s)

    def _metric_view(self) -> tuple[int, dict[str, tuple[int, bool]]]:
        status = self.status()
        return status.version, {n: (r.acked_version, r.connected) for n, r in status.nodes.items()}
