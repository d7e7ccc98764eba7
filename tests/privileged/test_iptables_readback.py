"""`podfence inspect` on the iptables dataplane: a NodeState applied to real chains and ipsets in a
node netns, read back (rules with the kernel's own counters, set members), compared with the
DesiredState the NodeState compiles to; then one rule deleted and one set flushed the way root
could, with the traffic showing the change is what the kernel enforces, and the difference reported.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.layout import DesiredState, Interface
from agent.dataplane.iptables.readback import read_endpoint
from agent.dataplane.readback import EndpointReadback, ProgrammedDirection
from agent.dataplane.types import NodeState
from tests.privileged import test_iptables_dataplane as base
from tests.privileged.iptables_netns import DataplaneWorker, Node
from tests.privileged.test_iptables_dataplane import TCP, cidr, from_pod, isolated, node_state

pytestmark = pytest.mark.needs("iptables-legacy", "ipset", "nsenter")  # and root (conftest.py)

UDP = 17
KEY = "default/pod2"
dataplane = base.dataplane  # the fixture: a started worker in conftest.py's node (three pods)


class Reader:
    """The read-back, run in a worker inside the node netns (the tables are per namespace)."""

    def read(self, key: str, desired: DesiredState | None) -> EndpointReadback:
        return read_endpoint(key, desired=desired)


@pytest.fixture
def reader(node: Node) -> Iterator[DataplaneWorker]:
    worker = DataplaneWorker(node.netns, Reader)
    try:
        yield worker
    finally:
        worker.stop()


def p2_state(node: Node) -> NodeState:
    """p2 admits p1 on tcp/80 and 10.1.0.0/16 on udp/53-54."""
    p1 = node.pods[0]
    return node_state(
        node, ingress={2: isolated(from_pod(p1, TCP, 80, 80), cidr("10.1.0.0/16", UDP, 53, 54))}
    )


def desired_of(node: Node, state: NodeState) -> DesiredState:
    interfaces = {p.ifindex: Interface(p.ifindex, p.host_if) for p in node.pods}
    return compile_state(state, interfaces, flows_per_pod=16384)


def side(readback: EndpointReadback, direction: str) -> ProgrammedDirection:
    (found,) = [d for d in readback.directions if d.direction == direction]
    return found


def inspect_json(node: Node, key: str = KEY) -> tuple[int, dict]:
    argv = (sys.executable, "-m", "agent.cli", "inspect", "--dataplane", "iptables", "--pod", key, "--json")
    done = node.in_node(*argv, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}


def test_the_read_back_is_the_applied_allow_list_with_rule_counters(
    node: Node, dataplane: DataplaneWorker, reader: DataplaneWorker
) -> None:
    p1, p2, p3 = node.pods
    state = p2_state(node)
    dataplane.call("apply", state)
    assert node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p3, "tcp", p2.ip, 80)
    readback = reader.call("read", KEY, desired_of(node, state))
    assert readback.differences == []
    assert readback.ifindex is None or readback.ifindex == p2.ifindex
    assert p2.ip in readback.addresses
    ingress = side(readback, "ingress")
    assert ingress.mode == "isolated"
    v4 = [r for r in ingress.rules if r.detail.startswith("ipv4 ")]
    (tcp,) = [r for r in v4 if r.protocol == "tcp" and r.ports == "80"]
    assert "pf-i4-" in tcp.peer and f"{p1.ip}/32" in tcp.peer and tcp.action == "allow"
    assert tcp.packets is not None and tcp.packets >= 1  # p1's SYN (the rest is established)
    (udp,) = [r for r in v4 if r.protocol == "udp"]
    assert udp.peer == "10.1.0.0/16" and udp.ports == "53-54" and udp.packets is not None
    final = v4[-1]
    assert (final.action, final.peer, final.protocol) == ("deny", "any address", "any")
    assert final.packets is not None and final.packets >= 1  # p3's SYN, maybe retransmitted
    assert ingress.allowed_packets >= 1 and ingress.denied_packets >= 1
    assert side(readback, "egress").mode == "open"
    code, shown = inspect_json(node)
    assert code == 0 and shown["differences"] == [], shown
    assert any(r["protocol"] == "tcp" and r["ports"] == "80" for r in side_json(shown, "ingress")["rules"])


def side_json(shown: dict, direction: str) -> dict:
    (found,) = [d for d in shown["directions"] if d["direction"] == direction]
    return found


def test_a_deleted_rule_and_a_flushed_set_are_reported(
    node: Node, dataplane: DataplaneWorker, reader: DataplaneWorker
) -> None:
    p1, p2, _ = node.pods
    state = p2_state(node)
    dataplane.call("apply", state)
    desired = desired_of(node, state)
    chain = desired.endpoint_chains[(KEY, "ingress")][4]
    (allow_tcp,) = [line for line in node.legacy_save(4).splitlines()
                    if line.startswith(f"-A {chain} ") and "--dport 80 " in line]  # fmt: skip
    node.in_node("sh", "-c", f"iptables-legacy {allow_tcp.replace('-A ', '-D ', 1)}")
    assert not node.probe(p1, "tcp", p2.ip, 80), "the lab must show the deleted rule is what allowed"
    (found,) = reader.call("read", KEY, desired).differences
    written = len(desired.chains[4][chain])
    assert found == f"ingress: ipv4 chain {chain} has {written - 1} rules, desired {written}"
    code, shown = inspect_json(node)
    assert code == 0, "without a record, the command sees no difference in a chain of consistent rules"
    v4_tcp = [
        r for r in side_json(shown, "ingress")["rules"] if r["protocol"] == "tcp" and "ipv4" in r["detail"]
    ]
    assert v4_tcp == [], "the read-back shows the kernel's rules, not the desired ones"
    identity_set = f"pf-i4-{p1.ip.rsplit('.', 1)[1]}"
    node.in_node("ipset", "flush", identity_set)
    differences = reader.call("read", KEY, desired).differences
    assert any(identity_set in d and f"{p1.ip}/32" in d and "lacks" in d for d in differences), differences
