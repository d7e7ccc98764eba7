"""The agent's flow buffer (issue 24): flow records from the feed, in batches onto the Sync stream.

The node's flow feed (flowfeed.py) hands every FlowRecord to `FlowBuffer.sink`, which only
appends to a bounded buffer (the newest `capacity` records, `--flow-buffer`) and returns: it
never waits for the network, so it never slows the feed, let alone the datapath. A record pushed
out by a newer one before it was sent is lost, and counted (`lost`, and in the next batch, so the
control service counts it too).

The sender thread (`run`) takes up to `batch_size` records at a time, waiting at most `linger_s`
for a batch to fill, and offers them to the Sync stream (`SyncClient.offer_flows`). The stream
takes a batch only when its control service said it accepts flows (an older one does not: the
records then wait here, the newest `capacity` of them) and while it holds fewer than a few
unsent batches; otherwise the sender keeps the records and tries again shortly. So while the
control service is away the buffer keeps the last `capacity` flows and sends them once a stream
is back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from agent.api import podfence_pb2 as pb
from agent.dataplane.flows import FlowRecord

DEFAULT_CAPACITY = 8192  # records kept while waiting for the stream (--flow-buffer)
DEFAULT_BATCH_SIZE = 256  # records per FlowBatch (~40 KB on the wire: far below the 4 MiB limit)
# The longest a record waits for its batch to fill: a quiet node's records wait it in full, so
# it is most of their delay to `observe`; a busy one fills batches sooner (the sink wakes the
# sender at batch_size). 20 ms: at most 50 batches a second from a node.
DEFAULT_LINGER_S = 0.02
RETRY_S = 0.5  # after the stream refused a batch


def record_to_proto(record: FlowRecord) -> pb.FlowRecord:
    """The wire form of a dataplane's record (the node is set by the control service)."""
    return pb.FlowRecord(
        time_ns=record.time_ns, endpoint=record.endpoint, direction=record.direction,
        protocol=record.protocol, source=record.source, destination=record.destination,
        source_port=record.source_port, destination_port=record.destination_port,
        verdict=str(record.verdict), reason=record.reason, rule_ref=record.rule_ref, tier=record.tier,
        policy=record.policy, rule=record.rule, packets=record.packets, bytes=record.bytes,
    )


class FlowBuffer:
    """Bounded, never-blocking sink for flow records; `run` sends them in batches."""

    def __init__(self, offer: Callable[[pb.FlowBatch], bool], capacity: int = DEFAULT_CAPACITY,
                 batch_size: int = DEFAULT_BATCH_SIZE, linger_s: float = DEFAULT_LINGER_S) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"flow buffer capacity and batch size must be >= 1, not {capacity}/{batch_size}")
        self._offer = offer
        self.capacity = capacity
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._cond = threading.Condition()
        # (sequence number, record): the sender removes exactly what it sent, even when newer
        # records pushed older ones out while the batch was on its way.
        self._records: deque[tuple[int, FlowRecord]] = deque()
        self._next_seq = 0
        self.received = 0  # records the feed handed over
        self.sent = 0  # records the stream took
        self.lost = 0  # records pushed out before they could be sent
        self._lost_unreported = 0  # not yet told to the control service
        self._sending_upto = -1  # sequence number of the last record of the batch on its way

    def sink(self, record: FlowRecord) -> None:
        """The feed's callback: keep `record`, dropping the oldest one when full. Never waits for I/O."""
        with self._cond:
            if len(self._records) >= self.capacity:
                seq, _ = self._records.popleft()
                if seq > self._sending_upto:  # one of the batch on its way is settled by the sender
                    self.lost += 1
                    self._lost_unreported += 1
            self._records.append((self._next_seq, record))
            self._next_seq += 1
            self.received += 1
            if len(self._records) >= self._batch_size:
                self._cond.notify()

    __call__ = sink

    def pending(self) -> int:
        with self._cond:
            return len(self._records)

    def run(self, stop: threading.Event) -> None:
        """Sends batches until `stop` is set."""
        while not stop.is_set():
            if not self.send_once(stop):
                stop.wait(RETRY_S)

    def send_once(self, stop: threading.Event | None = None) -> bool:
        """Waits (at most `linger_s`) for a batch, offers it; False when the stream refused it."""
        with self._cond:
            if len(self._records) < self._batch_size:
                self._cond.wait(self._linger_s)
            if not self._records and not self._lost_unreported:
                return True
            taken = [self._records[i] for i in range(min(self._batch_size, len(self._records)))]
            lost = self._lost_unreported
            last = taken[-1][0] if taken else -1
            self._sending_upto = last
        batch = pb.FlowBatch(records=[record_to_proto(record) for _, record in taken], lost=lost)
        accepted = self._offer(batch)
        with self._cond:
            self._sending_upto = -1
            if not accepted:
                # records of the refused batch that newer ones pushed out meanwhile are lost now
                first = self._records[0][0] if self._records else self._next_seq
                gone = sum(1 for seq, _ in taken if seq < first)
                self.lost += gone
                self._lost_unreported += gone
                return False
            self._lost_unreported -= lost
            while self._records and self._records[0][0] <= last:
                self._records.popleft()
            self.sent += len(taken)
        return True
