"""The agent's flow buffer: bounded, never waits on the stream, loses only what it counts."""

from __future__ import annotations

import threading

from agent.api import podfence_pb2 as pb
from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.node.flowbuffer import FlowBuffer, record_to_proto


def record(port: int) -> FlowRecord:
    return FlowRecord(time_ns=port, endpoint="shop/web-1", direction="ingress", protocol=6,
                      source="10.0.1.11", destination="10.0.1.10", source_port=40000, destination_port=port,
                      verdict=FlowVerdict.ALLOWED)


class Stream:
    """Stands in for SyncClient.offer_flows: takes batches while `open`, records what it took."""

    def __init__(self, open_: bool = True) -> None:
        self.open = open_
        self.batches: list[pb.FlowBatch] = []

    def offer(self, batch: pb.FlowBatch) -> bool:
        if self.open:
            self.batches.append(batch)
        return self.open

    def ports(self) -> list[int]:
        return [r.destination_port for batch in self.batches for r in batch.records]


def test_the_buffer_keeps_the_newest_records_and_counts_the_rest():
    stream = Stream(open_=False)
    buffer = FlowBuffer(stream.offer, capacity=10, batch_size=4, linger_s=0)
    for port in range(1, 26):
        buffer.sink(record(port))
    assert not buffer.send_once()
    assert (buffer.pending(), buffer.lost, buffer.sent) == (10, 15, 0)
    stream.open = True
    while buffer.pending():
        assert buffer.send_once()
    assert stream.ports() == list(range(16, 26))
    assert [len(batch.records) for batch in stream.batches] == [4, 4, 2]
    # the control service hears of the loss once, with the first batch it gets
    assert [batch.lost for batch in stream.batches] == [15, 0, 0]
    assert buffer.received == buffer.sent + buffer.lost == 25


def test_the_feed_never_waits_for_a_stream_that_is_stuck():
    release, offered = threading.Event(), threading.Event()

    def stuck(batch: pb.FlowBatch) -> bool:
        offered.set()
        return release.wait(30)  # a send that hangs (it never does: SyncClient.offer_flows only queues)

    buffer = FlowBuffer(stuck, capacity=1000, batch_size=10, linger_s=0)
    buffer.sink(record(0))
    stop = threading.Event()
    sender = threading.Thread(target=buffer.run, args=(stop,), daemon=True)
    sender.start()
    assert offered.wait(5)
    for port in range(1, 5001):  # the sender is stuck inside offer: the sink still returns each time
        buffer.sink(record(port))
    # record 0 is on its way, so not lost (yet): the sender settles it when the offer returns
    assert buffer.received == 5001 and buffer.pending() == 1000 and buffer.lost == 4000
    stop.set()
    release.set()
    sender.join(5)
    assert not sender.is_alive()
    assert buffer.received == buffer.sent + buffer.lost + buffer.pending()


def test_records_pushed_out_while_their_batch_is_on_its_way_are_counted_once():
    buffer: FlowBuffer

    def offer_and_overflow(batch: pb.FlowBatch) -> bool:
        for port in range(100, 106):  # the feed goes on meanwhile, pushing the batch's records out
            buffer.sink(record(port))
        return accept

    for accept in (True, False):
        buffer = FlowBuffer(offer_and_overflow, capacity=4, batch_size=4, linger_s=0)
        for port in range(1, 5):
            buffer.sink(record(port))
        buffer.send_once()
        # accepted: the 4 records went out, 2 of the 6 new ones were pushed out unsent;
        # refused: the 4 are gone too
        assert buffer.received == buffer.sent + buffer.lost + buffer.pending(), accept
        assert (buffer.sent, buffer.lost, buffer.pending()) == ((4, 2, 4) if accept else (0, 6, 4)), accept


def test_the_wire_form_carries_every_field_of_the_record():
    flow = FlowRecord(time_ns=123, endpoint="shop/web-1", direction="egress", protocol=17, source="10.0.1.10",
                      destination="10.96.0.10", source_port=5353, destination_port=53,
                      verdict=FlowVerdict.AUDIT_DENIED, reason="policy", rule_ref=7, tier="admin",
                      policy="deny-dns", rule="egress[2]", packets=3, bytes=180)
    wire = record_to_proto(flow)
    assert (wire.time_ns, wire.endpoint, wire.direction, wire.protocol) == (123, "shop/web-1", "egress", 17)
    assert (wire.source, wire.destination, wire.source_port, wire.destination_port) == (
        "10.0.1.10", "10.96.0.10", 5353, 53)
    assert (wire.verdict, wire.reason, wire.rule_ref) == ("audit-denied", "policy", 7)
    assert (wire.tier, wire.policy, wire.rule, wire.packets, wire.bytes) == (
        "admin", "deny-dns", "egress[2]", 3, 180)
    assert wire.node == ""  # only the control service sets it
