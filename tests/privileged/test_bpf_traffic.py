"""Real traffic through the BPF dataplane: a node netns with pod netns on veths (bpf_netns.py).

Each test applies a NodeState and checks what passes and what does not, in both directions,
for TCP, UDP and ICMP, through a ClusterIP, across agent restarts, under spoofing, at full
capacity and while the policy is being rewritten.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    NodeState,
)
from tests.privileged.bpf_netns import CLUSTER_IP, CLUSTER_PORT, NODE_IP, TOOL, Node, Pod, in_netns, ip

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nsenter") is None or not os.path.isdir("/sys/fs/bpf"),
    reason="needs root, nsenter and bpffs at /sys/fs/bpf",
)

TCP, UDP = 6, 17
SERVED_PORTS = (8080, 9090)
IDENTITY_OF_POD = {1: 101, 2: 102, 3: 103}  # pod index -> identity id


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(3)
    try:
        for pod in lab.pods:
            lab.serve(pod, *SERVED_PORTS)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def dataplane(node: Node) -> Iterator[BpfDataplane]:
    plane = BpfDataplane(pin_dir=node.pin_dir, netns=node.netns, state_file=node.state_file)
    plane.start()
    try:
        yield plane
    finally:
        plane.teardown()


def endpoint(
    pod: Pod, ingress: DirectionPolicy | None = None, egress: DirectionPolicy | None = None
) -> Endpoint:
    return Endpoint(
        key=f"ns/pod{pod.index}",
        ips=(ip(pod.ip), ip(pod.ip6)),
        ingress=ingress or DirectionPolicy(),
        egress=egress or DirectionPolicy(),
        ifindex=pod.ifindex,
    )


def isolated(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(isolated=True, allows=allows)


def state(node: Node, *endpoints: Endpoint, version: int = 1, unknown: tuple[Pod, ...] = ()) -> NodeState:
    by_key = {e.key: e for e in endpoints}
    identities = {IDENTITY_OF_POD[p.index]: (ip(p.ip), ip(p.ip6)) for p in node.pods}
    return NodeState(
        version=version,
        endpoints=by_key,
        identities=identities,
        node_ips=(ip(NODE_IP),),
        pod_interfaces=frozenset(p.ifindex for p in node.pods),
    )


def from_pod(pod: Pod, protocol: int = TCP, first: int = 0, last: int = 65535) -> Allow:
    return Allow(IdentityPeer(IDENTITY_OF_POD[pod.index]), protocol, first, last)


def test_identity_allow_and_deny_tcp_udp_icmp_both_directions(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods
    dataplane.apply(
        state(
            node,
            endpoint(a, egress=isolated(from_pod(b, TCP, 8080, 8080), from_pod(b, UDP, 9090, 9090))),
            endpoint(b, ingress=isolated(Allow(IdentityPeer(IDENTITY_OF_POD[1])))),  # every protocol from a
            endpoint(c),
        )
    )
    # a's egress: only b:8080/tcp and b:9090/udp
    assert a.tcp(b.ip, 8080) and a.tcp(b.ip6, 8080)
    assert a.udp(b.ip, 9090) and a.udp(b.ip6, 9090)
    assert not a.tcp(b.ip, 9090) and not a.tcp(b.ip6, 9090)
    assert not a.udp(b.ip, 8080)
    assert not a.tcp(c.ip, 8080) and not a.ping(c.ip)
    assert not a.ping(b.ip)  # ICMP needs a protocol-0 allow
    # b's ingress: everything from a only; replies of b's inbound flows pass b's (open) egress
    assert not c.tcp(b.ip, 8080) and not c.udp(b.ip, 9090) and not c.ping(b.ip) and not c.ping(b.ip6)
    # a's ingress is open: c reaches a; b (egress open) reaches a and c
    assert c.tcp(a.ip, 8080) and c.ping(a.ip) and c.ping(a.ip6)
    assert b.tcp(c.ip, 9090) and b.ping(c.ip)
    denied = dataplane.drop_reason_counts()["policy"]
    assert denied > 0
    events = dataplane.poll_events(100)
    assert any(
        e.endpoint == "ns/pod1" and e.direction == "egress" and e.destination_port == 9090 for e in events
    )
    counters = {(c.key, c.direction): c for c in dataplane.counters()}
    assert counters[("ns/pod1", "egress")].allowed_packets > 0
    assert counters[("ns/pod1", "egress")].denied_packets > 0
    assert counters[("ns/pod2", "ingress")].denied_packets > 0


def test_cluster_ip_egress_is_judged_on_the_backend(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods  # the ClusterIP DNATs to b:8080
    dataplane.apply(
        state(node, endpoint(a, egress=isolated(from_pod(b, TCP, 8080, 8080))), endpoint(b), endpoint(c))
    )
    assert a.tcp(CLUSTER_IP, CLUSTER_PORT)
    dataplane.apply(
        state(
            node,
            endpoint(a, egress=isolated(from_pod(c, TCP, 8080, 8080))),
            endpoint(b),
            endpoint(c),
            version=2,
        )
    )
    assert not a.tcp(CLUSTER_IP, CLUSTER_PORT)
    assert a.tcp(c.ip, 8080)
    # ingress-isolated client: the reply comes back from the ClusterIP after un-DNAT and passes
    dataplane.apply(
        state(
            node,
            endpoint(a, ingress=isolated(), egress=isolated(from_pod(b, TCP, 8080, 8080))),
            endpoint(b),
            endpoint(c),
            version=3,
        )
    )
    assert a.tcp(CLUSTER_IP, CLUSTER_PORT)
    assert not c.tcp(a.ip, 8080)


def test_node_addresses_always_reach_pods(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods
    dataplane.apply(state(node, endpoint(a, ingress=isolated(), egress=isolated()), endpoint(b), endpoint(c)))
    probe = subprocess.run(
        in_netns(node.netns, sys.executable, str(TOOL), "tcp", a.ip, "8080"), capture_output=True, check=False
    )
    assert probe.returncode == 0  # kubelet-style probe from the node address (source NODE_IP)
    assert not b.tcp(a.ip, 8080)


def test_cidr_with_except(node: Node, dataplane: BpfDataplane) -> None:
    a, b, c = node.pods
    block = CidrPeer(ipaddress.ip_network("10.2.0.0/24"), (ipaddress.ip_network(f"{c.ip}/32"),))
    dataplane.apply(
        state(node, endpoint(a, egress=isolated(Allow(block, TCP, 8000, 8999))), endpoint(b), endpoint(c))
    )
    assert a.tcp(b.ip, 8080)
    assert not a.tcp(b.ip, 9090)
    assert not a.tcp(c.ip, 8080)  # carved out by the except


def test_unknown_interface_is_dropped_until_its_endpoint_is_known(
    node: Node, dataplane: BpfDataplane
) -> None:
    a, b, c = node.pods
    dataplane.apply(state(node, endpoint(a), endpoint(b)))  # c's interface is guarded, unclaimed
    assert a.tcp(b.ip, 8080)
    assert not a.tcp(c.ip, 8080) and not c.ping(a.ip)
    assert dataplane.drop_reason_counts()["unknown_endpoint"] > 0
    dataplane.apply(state(node, endpoint(a), endpoint(b), endpoint(c), version=2))
    assert a.tcp(c.ip, 8080) and c.ping(a.ip)
