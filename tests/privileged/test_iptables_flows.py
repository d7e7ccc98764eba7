"""Flow records of the iptables dataplane against real traffic (issue 24): the deciding rules log
to NFLOG (flowrecords.py), the dataplane reads the group back (nflog.py) and names each record's
endpoint, policy and rule. Pods 1..3 in their netns (iptables_netns.py), the dataplane in a
worker inside the node netns, where its NFLOG socket listens.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dataplane.flows import FlowRecord, FlowVerdict
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.iptables.flowrecords import NO_POLICY, NO_RULE
from agent.dataplane.types import Allow, DirectionPolicy, IdentityPeer
from tests.privileged.iptables_netns import DataplaneWorker, Node, Pod, running
from tests.privileged.test_iptables_dataplane import identity_of, node_state

pytestmark = pytest.mark.needs("iptables-legacy", "ipset")

TCP, UDP = 6, 17
GROUP = 2471  # not the agent's default: a test never competes with an agent on this machine


@contextlib.contextmanager
def recording(node: Node, **options: Any) -> Iterator[DataplaneWorker]:
    """A dataplane with flow records on, its NFLOG group bound (what is logged before has no
    listener), torn down after."""
    factory = functools.partial(IptablesDataplane, flow_group=GROUP, denied_flow_interval_s=0.3, **options)
    with running(node.netns, factory) as dataplane:
        dataplane.call("poll_flows", 0)
        yield dataplane


@pytest.fixture
def dataplane(node: Node) -> Iterator[DataplaneWorker]:
    with recording(node) as dataplane:
        yield dataplane


def web_allow(peer: Pod) -> Allow:
    return Allow(IdentityPeer(identity_of(peer)), TCP, 80, 80, "default/web", "ingress[0]")


def collect(dataplane: DataplaneWorker, until: object, timeout: float = 5.0) -> list[FlowRecord]:
    """Records polled until `until(records)` holds or `timeout` passes."""
    records: list[FlowRecord] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records += dataplane.call("poll_flows", 100)
        if until(records):  # type: ignore[operator]
            break
    return records


def send_udp(node: Node, pod: Pod, destination: str, port: int, count: int, first_port: int = 0) -> None:
    """`count` datagrams from `pod`: one flow (one socket), or one flow each from first_port on."""
    script = (
        "import socket,sys\n"
        "dst, port, count, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for i in range(count):\n"
        "    if first:\n"
        "        s.close(); s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', first + i))\n"
        "    s.sendto(b'x', (dst, port))\n"
    )
    node.in_pod(pod, sys.executable, "-c", script, destination, str(port), str(count), str(first_port))


def of(records: list[FlowRecord], endpoint: str, direction: str) -> list[FlowRecord]:
    return [r for r in records if r.endpoint == endpoint and r.direction == direction]


def denied(records: list[FlowRecord]) -> list[FlowRecord]:
    """The denied records of pod2's ingress (where the tests' denied flows end)."""
    return [r for r in of(records, "default/pod2", "ingress") if r.verdict == FlowVerdict.DENIED]


def test_an_allowed_flow_is_one_record_naming_its_policy_and_rule(
    node: Node, dataplane: DataplaneWorker
) -> None:
    p1, p2, _ = node.pods
    dataplane.call("apply", node_state(node, ingress={2: DirectionPolicy(True, (web_allow(p1),))}))
    assert node.probe(p1, "tcp", p2.ip, 80)

    records = collect(dataplane, lambda r: len(of(r, "default/pod2", "ingress")) >= 1)
    records += collect(dataplane, lambda r: False, timeout=0.5)  # nothing more may come

    [ingress] = of(records, "default/pod2", "ingress")
    assert ingress.verdict == FlowVerdict.ALLOWED
    assert (ingress.tier, ingress.policy, ingress.rule) == (
        "networkpolicy",
        "default/web",
        "ingress[0]",
    )
    assert ingress.rule_ref != 0 and ingress.reason == ""
    assert (ingress.protocol, ingress.source, ingress.destination, ingress.destination_port) == (
        TCP,
        p1.ip,
        p2.ip,
        80,
    )
    assert ingress.packets == 1 and ingress.bytes > 0
    # pod1 is selected by no policy: its egress allows everything, and says so
    [egress] = of(records, "default/pod1", "egress")
    assert (egress.verdict, egress.rule, egress.rule_ref, egress.tier) == (
        FlowVerdict.ALLOWED,
        NO_POLICY,
        0,
        "default",
    )
    # the handshake's replies and the data are established: no record of theirs
    assert len(records) == 2, records


def test_a_denied_flow_of_n_packets_is_records_summing_to_n(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, _ = node.pods
    dataplane.call("apply", node_state(node, ingress={2: DirectionPolicy(True, (web_allow(p1),))}))
    count = 7

    send_udp(node, p1, p2.ip, 53, count)
    records = collect(dataplane, lambda r: sum(x.packets for x in denied(r)) >= count)
    records += collect(dataplane, lambda r: False, timeout=0.8)  # a late extra record would show here

    flow = denied(records)
    assert sum(r.packets for r in flow) == count, flow
    assert 1 <= len(flow) < count  # added up, not one record per packet
    assert flow[0].packets == 1  # the first packet is reported at once
    for record in flow:
        assert (record.reason, record.rule, record.rule_ref, record.policy) == ("policy", NO_RULE, 0, "")
        assert (record.protocol, record.source, record.destination, record.destination_port) == (
            UDP,
            p1.ip,
            p2.ip,
            53,
        )
    # the sender's side allowed every packet (each NEW again: the peer dropped it unconfirmed),
    # yet it is one flow and one record
    assert len(of(records, "default/pod1", "egress")) == 1


def test_a_denied_flood_is_bounded_counted_and_traffic_flows(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, _ = node.pods
    dataplane.call("apply", node_state(node, ingress={2: DirectionPolicy(True, (web_allow(p1),))}))
    flood = 3000

    send_udp(node, p1, p2.ip, 53, flood)  # one flow, as fast as Python sends
    assert node.probe(p1, "tcp", p2.ip, 80)  # the allowed traffic is unaffected
    records = collect(dataplane, lambda r: False, timeout=1.5)

    flow = denied(records)
    logged = sum(r.packets for r in flow)
    unlogged = dataplane.call("denied_unlogged")
    assert logged + unlogged == flood  # every denied packet is either in a record or counted
    assert unlogged > 0 and logged < 200  # the per-flow log rate held the flood back
    assert len(flow) <= 10
    counters = {(c.key, c.direction): c for c in dataplane.call("counters")}
    assert counters["default/pod2", "ingress"].denied_packets >= flood


def test_new_flows_beyond_the_socket_are_lost_and_counted_exactly(node: Node) -> None:
    p1, p2, _ = node.pods
    with recording(node, flow_receive_buffer=16384) as dataplane:  # a few dozen records queue, no more
        dataplane.call("apply", node_state(node, ingress={2: DirectionPolicy(True, (web_allow(p1),))}))
        flows = 400
        # new allowed flows (one source port each) to pod2's UDP echo... denied at pod2: udp/53 is
        # not in its list, so every flow is one denied record there and one allowed at pod1
        send_udp(node, p1, p2.ip, 53, flows, first_port=30000)
        time.sleep(0.5)  # not read meanwhile: the socket overflows
        records = collect(dataplane, lambda r: False, timeout=1.0)
        # Losses show as a gap in the group's sequence numbers: those at the end of a burst are
        # counted when the next record arrives. One more flow (two records) closes the gap.
        send_udp(node, p1, p2.ip, 53, 1, first_port=30000 + flows)
        records += collect(dataplane, lambda r: False, timeout=1.0)
        lost = dataplane.call("flows_lost")
        assert lost > 0
        assert len(records) + lost == 2 * (flows + 1), (len(records), lost)  # nothing vanishes uncounted
        # and the datapath never waited for the reader
        assert node.probe(p1, "tcp", p2.ip, 80)


def test_records_off_leave_the_chains_as_they_were(node: Node) -> None:
    with running(node.netns, IptablesDataplane) as dataplane:
        allow = DirectionPolicy(True, (web_allow(node.pods[0]),))
        dataplane.call("apply", node_state(node, ingress={2: allow}))
        saved = node.legacy_save()
        assert "NFLOG" not in saved and "PF-L" not in saved
        assert dataplane.call("poll_flows", 0) == [] and dataplane.call("flows_lost") == 0


def test_ipv6_and_bridged_pods_name_their_endpoint(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, _ = node.pods
    node.in_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")  # the dataplane turns it on
    b1, b2 = node.add_bridged_pod(11), node.add_bridged_pod(12)
    for pod in (b1, b2):
        node.serve(pod, tcp=(80,))
    policy = DirectionPolicy(True, (web_allow(p1), web_allow(b1)))
    dataplane.call("apply", node_state(node, ingress={2: policy, 5: policy}))
    assert p2.ip6 is not None
    assert node.probe(p1, "tcp", p2.ip6, 80)  # IPv6
    assert node.probe(b1, "tcp", b2.ip, 80)  # bridge to bridge: physdev ports
    assert not node.probe(p2, "tcp", b2.ip, 80)  # routed into the bridge: the address names it

    def complete(records: list[FlowRecord]) -> bool:
        return len(of(records, "default/pod5", "ingress")) >= 2 and bool(
            of(records, "default/pod2", "ingress")
        )

    records = collect(dataplane, complete)
    [six] = of(records, "default/pod2", "ingress")
    assert (six.source, six.destination, six.verdict, six.policy) == (
        p1.ip6,
        p2.ip6,
        FlowVerdict.ALLOWED,
        "default/web",
    )
    bridged = {(r.source, r.verdict) for r in of(records, "default/pod5", "ingress")}
    assert bridged == {(b1.ip, FlowVerdict.ALLOWED), (p2.ip, FlowVerdict.DENIED)}
    egress = of(records, "default/pod4", "egress")
    assert [r.verdict for r in egress if r.reason != "spoofed_source"] == [FlowVerdict.ALLOWED], egress
    assert not [r for r in records if r.endpoint == ""]


def test_drops_for_other_reasons_are_records_naming_the_reason(
    node: Node, dataplane: DataplaneWorker
) -> None:
    p1, p2, p3 = node.pods
    dataplane.call("apply", node_state(node, unclaimed=(3,)))  # pod3's interface: no known pod
    node.in_pod(p1, "ip", "addr", "add", "10.1.0.99/32", "dev", "eth0")
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind((sys.argv[1], 0))\n"
        "s.sendto(b'x', (sys.argv[2], 53))\n"
    )
    node.in_pod(p1, sys.executable, "-c", script, "10.1.0.99", p2.ip)  # not pod1's address
    send_udp(node, p3, p2.ip, 53, 1)

    def complete(records: list[FlowRecord]) -> bool:
        return {r.reason for r in records} >= {"spoofed_source", "unknown_endpoint"}

    records = collect(dataplane, complete)
    [spoofed] = [r for r in records if r.reason == "spoofed_source"]
    assert (spoofed.endpoint, spoofed.direction, spoofed.source, spoofed.verdict) == (
        "default/pod1", "egress", "10.1.0.99", FlowVerdict.DENIED,
    )  # fmt: skip
    [unknown] = [r for r in records if r.reason == "unknown_endpoint"]
    assert (unknown.endpoint, unknown.direction, unknown.source) == ("", "egress", p3.ip)
    assert spoofed.rule_ref == unknown.rule_ref == 0 and spoofed.rule and unknown.rule
