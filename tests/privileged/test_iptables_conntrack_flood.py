"""Conntrack floods through the iptables dataplane (issue 21, item 10), on real traffic.

The kernel's nf_conntrack is one table for the node, but unlike the eBPF LRU it never evicts an
assured connection: when full, it refuses every new one on the node. Filling it takes
nf_conntrack_max entries, a setting of the whole machine (other namespaces' tables count
against it), so the test does not fill it: it shows that a pod's flood is bounded (the flows
beyond flows_per_pod are dropped and counted as the pod's egress denials, conntrack holds no
more of them) and that another pod's flow is untouched. Without the bound every flow of the
flood is admitted and tracked (the control)."""

from __future__ import annotations

import pytest

from agent.dataplane.iptables import IptablesDataplane
from tests.privileged.flood_lab import idle_flow_survives_a_flood
from tests.privileged.iptables_netns import NODE_IP, DataplaneWorker, Node
from tests.privileged.test_iptables_dataplane import UDP, from_pod, isolated, node_state

pytestmark = pytest.mark.needs("conntrack")  # and root (conftest.py)

FLOOD = 400
BOUND = 64


def tracked_from(node: Node, address: str) -> int:
    listed = node.in_node("conntrack", "-L", "-p", "udp", "-s", address, check=False)
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("udp"))


@pytest.mark.parametrize("bound", [0, BOUND])
def test_a_flood_is_bounded_per_pod_and_counted(node: Node, bound: int) -> None:
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(flows_per_pod=bound))
    try:
        worker.call("start")
        _, b, c = node.pods
        state = node_state(node, ingress={1: isolated()}, egress={1: isolated(from_pod(b, UDP, 7000, 7000))})
        worker.call("apply", state)
        assert idle_flow_survives_a_flood(node.pods, NODE_IP, FLOOD)
        flooder = {x.direction: x for x in worker.call("counters") if x.key == "default/pod3"}
        if bound == 0:  # the control, and main before the bound: everything admitted and tracked
            assert flooder["egress"].denied_packets == 0
            assert tracked_from(node, c.ip) >= FLOOD
        else:
            # two datagrams a flow (flood_tool.py): each of a refused flow is dropped
            assert flooder["egress"].denied_packets == 2 * (FLOOD - BOUND)
            assert tracked_from(node, c.ip) == BOUND
    finally:
        try:
            worker.call("teardown")
        finally:
            worker.stop()
