"""The control service's flow relay (issue 24): agents' flow records in, `podfence observe` out.

Each agent pushes FlowBatches over its Sync stream (server.py); `publish` checks every record
(a malformed one is counted and dropped, never stored), tags it with the node the stream is
bound to (whatever the agent wrote there), names the pods that own its addresses from the
control's own pod cache, keeps it in that node's bounded ring (the newest `ring_size`, within
one budget for all nodes, `max_records`; late readers ask for `since` or `last`) and offers it
to every Observe reader whose filter it matches.

Readers never slow the hub or each other: each has its own bounded queue, filled without
waiting; a record that does not fit is lost for that reader alone, counted, and the next record
it does get says how many it lost before it (`lost_before`). Publishing costs one pass over the
readers under the relay's lock, never a network write.
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.api import podfence_pb2 as pb
from agent.control.metrics import ControlMetrics

VERDICTS = ("allowed", "denied", "audit-denied")  # agent/dataplane/flows.py FlowVerdict
DIRECTIONS = ("ingress", "egress")
DEFAULT_RING_SIZE = 4096  # records kept per node for late readers
DEFAULT_READER_QUEUE = 1024  # records waiting for one slow reader before it starts losing them
DEFAULT_MAX_READERS = 16  # Observe --follow streams at once; each holds a thread of the reserve (server.py)
DEFAULT_MAX_NODES = 10_000  # rings kept; the node silent longest gives its ring up first
# Records stored over all rings (~270 bytes each stored: ~70 MB). Past it, rings shrink to an
# equal share, so many nodes get smaller rings rather than one unbounded pile.
DEFAULT_MAX_RECORDS = 262_144
_MAX_TEXT = 512  # longest string field accepted from an agent


class FilterError(ValueError):
    """An ObserveRequest that cannot be a filter (the caller's mistake: INVALID_ARGUMENT)."""


def _peer(text: str, what: str) -> str:
    """A filter peer: "namespace/pod", "namespace/" or an IP address (normalised)."""
    if "/" in text:
        namespace, _, name = text.partition("/")
        if not namespace or "/" in name:
            raise FilterError(f"{what} {text!r}: expected NAMESPACE/POD, NAMESPACE/ or an IP address")
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise FilterError(f"{what} {text!r}: expected NAMESPACE/POD, NAMESPACE/ or an IP address") from None


def _peer_matches(wanted: frozenset[str], address: str, pod: str) -> bool:
    if address in wanted or pod in wanted:
        return True
    return bool(pod) and pod.partition("/")[0] + "/" in wanted


@dataclass(frozen=True)
class FlowFilter:
    """What one reader asked for; an empty set matches everything."""

    from_peers: frozenset[str] = frozenset()
    to_peers: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    pods: frozenset[str] = frozenset()
    verdicts: frozenset[str] = frozenset()
    protocols: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    policies: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()

    @classmethod
    def from_request(cls, request: pb.ObserveRequest) -> FlowFilter:
        bad = [v for v in request.verdicts if v not in VERDICTS]
        if bad:
            raise FilterError(f"unknown verdict {bad[0]!r}; one of {', '.join(VERDICTS)}")
        for pod in request.pods:
            namespace, sep, name = pod.partition("/")
            if not sep or not namespace or not name:
                raise FilterError(f"pod {pod!r}: expected NAMESPACE/POD")
        if any(p > 255 for p in request.protocols):
            raise FilterError("a protocol number above 255")
        if any(p > 65535 for p in request.ports):
            raise FilterError("a port above 65535")
        return cls(
            from_peers=frozenset(_peer(p, "from") for p in request.from_peers),
            to_peers=frozenset(_peer(p, "to") for p in request.to_peers),
            namespaces=frozenset(request.namespaces),
            pods=frozenset(request.pods),
            verdicts=frozenset(request.verdicts),
            protocols=frozenset(request.protocols),
            ports=frozenset(request.ports),
            policies=frozenset(request.policies),
            nodes=frozenset(request.nodes),
        )

    def matches(self, record: pb.FlowRecord) -> bool:
        if self.verdicts and record.verdict not in self.verdicts:
            return False
        if self.nodes and record.node not in self.nodes:
            return False
        if self.protocols and record.protocol not in self.protocols:
            return False
        if self.ports and record.source_port not in self.ports and record.destination_port not in self.ports:
            return False
        if self.policies and record.policy not in self.policies:
            return False
        if self.from_peers and not _peer_matches(self.from_peers, record.source, record.source_pod):
            return False
        if self.to_peers and not _peer_matches(self.to_peers, record.destination, record.destination_pod):
            return False
        if self.pods and record.source_pod not in self.pods and record.destination_pod not in self.pods:
            return False
        if self.namespaces:
            sides = {record.source_pod.partition("/")[0], record.destination_pod.partition("/")[0]}
            if not sides & self.namespaces:
                return False
        return True


def checked(record: pb.FlowRecord) -> pb.FlowRecord | None:
    """A copy of an agent's record fit to relay (addresses in their one text form, so filters
    and pod names match however the agent wrote them); None when it is malformed."""
    if record.verdict not in VERDICTS or record.direction not in DIRECTIONS or record.time_ns <= 0:
        return None
    if record.protocol > 255 or record.source_port > 65535 or record.destination_port > 65535:
        return None
    texts = (record.endpoint, record.reason, record.tier, record.policy, record.rule)
    if any(len(text) > _MAX_TEXT for text in texts):
        return None
    try:
        source = str(ipaddress.ip_address(record.source))
        destination = str(ipaddress.ip_address(record.destination))
    except ValueError:
        return None
    fresh = _copy(record)  # a stored record must not keep its whole batch alive
    fresh.source, fresh.destination = source, destination
    return fresh


class Reader:
    """One Observe stream's bounded queue: filled by `offer` without waiting, drained by `next`."""

    def __init__(self, flow_filter: FlowFilter, max_queued: int,
                 wake: Callable[[], None] | None = None) -> None:
        self.filter = flow_filter
        self._max = max_queued
        # An event-loop reader cannot wait on the condition: `wake` (thread-safe, quick) tells it
        # a record was queued (observe_service.py AsyncFlowObserverService).
        self._wake = wake
        self._queue: deque[pb.FlowRecord] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._lost = 0  # since the last record handed out
        self.lost_total = 0

    def offer(self, record: pb.FlowRecord) -> bool:
        """Queue `record` if there is room; False when it was lost (the reader is too slow)."""
        with self._cond:
            if self._closed:
                return True
            if len(self._queue) >= self._max:
                self._lost += 1
                self.lost_total += 1
                return False
            was_empty = not self._queue
            self._queue.append(record)
            self._cond.notify()
        if was_empty and self._wake is not None:  # a reader that found none clears, then checks
            self._wake()
        return True

    def next(self, timeout: float) -> pb.FlowRecord | None:
        """The next record (with what was lost before it), or None after `timeout` or once closed."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout)
            if not self._queue:
                return None
            record = self._queue.popleft()
            if self._lost:
                record = _copy(record)
                record.lost_before = self._lost
                self._lost = 0
            return record

    def drain(self, limit: int) -> list[pb.FlowRecord]:
        """Up to `limit` queued records without waiting (the first with what was lost before it)."""
        with self._cond:
            taken = [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]
            if taken and self._lost:
                taken[0] = _copy(taken[0])
                taken[0].lost_before = self._lost
                self._lost = 0
            return taken

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if self._wake is not None:
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed


def _copy(record: pb.FlowRecord) -> pb.FlowRecord:
    fresh = pb.FlowRecord()
    fresh.CopyFrom(record)
    return fresh


class TooManyReaders(Exception):
    """The relay holds `max_readers` Observe streams already."""


class FlowRelay:
    """Per-node rings of recent records and the fan-out to Observe readers."""

    def __init__(
        self,
        metrics: ControlMetrics,
        pods_by_ip: Callable[[], Mapping[str, str]] = dict,
        ring_size: int = DEFAULT_RING_SIZE,
        reader_queue: int = DEFAULT_READER_QUEUE,
        max_readers: int = DEFAULT_MAX_READERS,
        max_nodes: int = DEFAULT_MAX_NODES,
        max_records: int = DEFAULT_MAX_RECORDS,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if min(ring_size, reader_queue, max_readers, max_nodes, max_records) < 1:
            raise ValueError("flow relay bounds must be at least 1")
        self.metrics = metrics
        self._pods_by_ip = pods_by_ip
        self._ring_size = ring_size
        self._reader_queue = reader_queue
        self._max_readers = max_readers
        self._max_nodes = max_nodes
        self._max_records = max_records
        self._stored_count = 0
        self._clock = clock
        self._lock = threading.Lock()
        # Stored serialised, (time_ns, bytes): a parsed record costs ~1.2 KB, its bytes ~200 B.
        self._rings: OrderedDict[str, deque[tuple[int, bytes]]] = OrderedDict()
        self._readers: set[Reader] = set()
        metrics.watch_flow_readers(self.reader_count)

    def publish(self, node: str, batch: pb.FlowBatch) -> None:
        """Relays the records `node`'s agent sent; bad ones are counted and left out."""
        if batch.lost:
            self.metrics.flow_agent_lost_total.inc(batch.lost)
        owners = self._pods_by_ip()
        accepted: list[pb.FlowRecord] = []
        for wire in batch.records:
            record = checked(wire)
            if record is None:
                self.metrics.flow_records_total.labels("invalid").inc()
                continue
            record.node = node
            record.source_pod = owners.get(record.source, "")
            record.destination_pod = owners.get(record.destination, "")
            record.lost_before = 0
            accepted.append(record)
        if not accepted:
            return
        self.metrics.flow_records_total.labels("accepted").inc(len(accepted))
        lost = 0
        stored = [(record.time_ns, record.SerializeToString()) for record in accepted]
        with self._lock:
            ring = self._rings.get(node)
            if ring is None:
                ring = self._rings[node] = deque(maxlen=self._ring_size)
                while len(self._rings) > self._max_nodes:
                    _, gone = self._rings.popitem(last=False)
                    self._stored_count -= len(gone)
            self._rings.move_to_end(node)
            before = len(ring)
            ring.extend(stored)
            self._stored_count += len(ring) - before
            self._keep_within_budget(ring)
            for reader in self._readers:
                for record in accepted:
                    if reader.filter.matches(record) and not reader.offer(record):
                        lost += 1
        if lost:
            self.metrics.flow_reader_lost_total.inc(lost)

    def _keep_within_budget(self, publishing: deque[tuple[int, bytes]]) -> None:
        """Past `max_records`, shrink rings to an equal share: the publishing one first, then the
        longest silent ones. Some ring is above the share whenever the total is above the budget,
        and every record trimmed was stored once: the work is bounded by what was published."""
        if self._stored_count <= self._max_records:
            return
        share = max(1, self._max_records // len(self._rings))
        for ring in itertools.chain((publishing,), self._rings.values()):
            while len(ring) > share and self._stored_count > self._max_records:
                ring.popleft()
                self._stored_count -= 1
            if self._stored_count <= self._max_records:
                return

    def subscribe(self, flow_filter: FlowFilter, since_seconds: float = 0.0, last: int = 0,
                  follow: bool = False, wake: Callable[[], None] | None = None,
                  ) -> tuple[list[pb.FlowRecord], Reader | None]:
        """The stored records asked for (oldest first) and, with `follow`, a reader registered in
        the same step, so that nothing falls between the two nor comes twice. The stored records
        are parsed and filtered outside the lock: publishing never waits for a reader's query."""
        oldest = self._clock() - int(since_seconds * 1e9) if since_seconds > 0 else None
        wanted = since_seconds > 0 or last > 0
        with self._lock:
            if follow and len(self._readers) >= self._max_readers:
                raise TooManyReaders(f"{self._max_readers} Observe streams are open already")
            candidates = [entry for ring in self._rings.values() for entry in ring
                          if oldest is None or entry[0] >= oldest] if wanted else []
            reader = None
            if follow:
                reader = Reader(flow_filter, self._reader_queue, wake)
                self._readers.add(reader)
        candidates.sort(key=lambda entry: entry[0])
        if oldest is not None:
            found = [record for record in (pb.FlowRecord.FromString(data) for _, data in candidates)
                     if flow_filter.matches(record)]
            return found, reader
        newest: list[pb.FlowRecord] = []  # the newest `last` that match: parse from the newest back
        for _, data in reversed(candidates):
            if len(newest) >= last:
                break
            record = pb.FlowRecord.FromString(data)
            if flow_filter.matches(record):
                newest.append(record)
        newest.reverse()
        return newest, reader

    def stored_count(self) -> int:
        with self._lock:
            return self._stored_count

    def unsubscribe(self, reader: Reader) -> None:
        reader.close()
        with self._lock:
            self._readers.discard(reader)

    def handle_message(self, handle: Any, message: pb.AgentMessage) -> None:
        """An AgentMessage handler (the event-loop Sync service's `add_message_handler("flows",
        ...)`): `handle.node` is the node the stream is bound to."""
        self.publish(handle.node, message.flows)

    def sent(self, count: int = 1) -> None:
        self.metrics.flow_relayed_total.inc(count)

    def reader_count(self) -> int:
        with self._lock:
            return len(self._readers)

    def nodes(self) -> Iterable[str]:
        with self._lock:
            return list(self._rings)
