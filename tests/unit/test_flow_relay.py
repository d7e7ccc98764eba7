"""The control service's flow relay in process: its bounds hold against a node that floods it."""

from __future__ import annotations

from agent.api import podfence_pb2 as pb
from agent.control.flow_relay import FlowFilter, FlowRelay
from agent.control.metrics import ControlMetrics


def batch(count: int, first_port: int = 1, time_ns: int = 1) -> pb.FlowBatch:
    return pb.FlowBatch(records=[
        pb.FlowRecord(time_ns=time_ns, endpoint="shop/web-1", direction="ingress", protocol=6,
                      source="10.0.1.11", destination="10.0.1.10", destination_port=first_port + i,
                      verdict="allowed")
        for i in range(count)
    ])


def test_a_flooding_node_overwrites_only_its_own_ring():
    relay = FlowRelay(ControlMetrics(), ring_size=100)
    relay.publish("quiet", batch(3, first_port=1))
    for _ in range(50):
        relay.publish("loud", batch(256, first_port=1000))
    stored, _ = relay.subscribe(FlowFilter(), last=10_000)
    by_node = {node: sum(1 for r in stored if r.node == node) for node in ("quiet", "loud")}
    assert by_node == {"quiet": 3, "loud": 100}


def test_rings_are_kept_for_a_bounded_number_of_nodes_the_longest_silent_go_first():
    relay = FlowRelay(ControlMetrics(), ring_size=10, max_nodes=3)
    for node in ("a", "b", "c"):
        relay.publish(node, batch(1))
    relay.publish("a", batch(1))  # a spoke last: b is now the longest silent
    relay.publish("d", batch(1))
    assert sorted(relay.nodes()) == ["a", "c", "d"]


def test_stored_records_are_copies_that_do_not_hold_their_batch():
    relay = FlowRelay(ControlMetrics())
    sent = batch(2)
    relay.publish("n1", sent)
    sent.records[0].destination_port = 9999  # the wire message is the server's to reuse
    stored, _ = relay.subscribe(FlowFilter(), last=10)
    assert [r.destination_port for r in stored] == [1, 2]
    assert all(r.node == "n1" for r in stored) and not sent.records[1].node


def test_a_reader_that_left_gets_nothing_more_and_costs_nothing():
    metrics = ControlMetrics()
    relay = FlowRelay(metrics, reader_queue=2)
    _, reader = relay.subscribe(FlowFilter(), follow=True)
    assert reader is not None and relay.reader_count() == 1
    relay.unsubscribe(reader)
    relay.publish("n1", batch(5))
    assert relay.reader_count() == 0 and reader.next(timeout=0) is None
    assert metrics.flow_reader_lost_total._value.get() == 0


def test_addresses_are_relayed_in_one_text_form_whatever_the_agent_wrote():
    relay = FlowRelay(ControlMetrics(), pods_by_ip=lambda: {"fd00::a": "shop/web-1"})
    wire = batch(1)
    wire.records[0].source, wire.records[0].destination = "FD00:0:0::B", "fd00:0000::a"
    relay.publish("n1", wire)
    (record,), _ = relay.subscribe(FlowFilter(), last=1)
    assert (record.source, record.destination, record.destination_pod) == ("fd00::b", "fd00::a", "shop/web-1")
    (found,), _ = relay.subscribe(FlowFilter(from_peers=frozenset({"fd00::b"})), last=1)
    assert found.source == "fd00::b"


def test_the_records_of_all_nodes_stay_within_the_budget_shared_out_equally():
    relay = FlowRelay(ControlMetrics(), ring_size=1000, max_records=1000)
    for round_ in range(3):
        for node in range(20):  # 20 nodes of 256 records each, three times over
            relay.publish(f"n{node}", batch(256, time_ns=round_ + 1))
            assert relay.stored_count() <= 1000
    stored, _ = relay.subscribe(FlowFilter(), last=10_000)
    per_node = {r.node for r in stored}
    assert len(stored) == relay.stored_count() and len(per_node) == 20  # every node kept some
