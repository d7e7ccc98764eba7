"""Per-entry deltas down to the kernel (issue 27): a BPF dataplane fed a run of small edits of a big
allow list, each received as a wire delta (allow entries in and out) and compiled with the
compiler's memory warm, ends with maps that answer every probe as a fresh dataplane programmed
from one snapshot of the last version does. The maps are read back from the kernel (the pins)
for both, and judged by the datapath's lookup rules (tests/unit/test_bpf_plan.py).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest

from agent.control.encode import delta_message, snapshot_message
from agent.dataplane.bpf import cidr_classes, maps
from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.types import NodeState
from agent.node.decode import DecodeCache, apply_message
from agent.policy.compiled import (
    AllowEntry,
    CidrRef,
    DirectionAllows,
    EndpointPolicy,
    IdentityRef,
    NodePolicy,
    normalize_allows,
)
from tests.privileged.bpf_netns import NODE_IP, Node, ip
from tests.unit.test_bpf_plan import datapath_allows

pytestmark = pytest.mark.needs("nsenter", "bpffs")  # and root (conftest.py)

PEERS = 400
TCP = 6


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(2)
    try:
        yield lab
    finally:
        lab.destroy()


def host(index: int) -> CidrRef:
    return CidrRef(ipaddress.ip_network(f"172.16.{index // 200}.{index % 200 + 1}/32"))


def policies(node: Node, versions: int) -> list[NodePolicy]:
    """Pod 1 admits a big list of hosts (and a /24 around some of them, and an identity) on TCP
    80; pod 2 the same list on any port. Each version replaces a few hosts of the list."""
    rng = random.Random(27)
    chosen = list(range(PEERS))
    fixed = [AllowEntry(CidrRef(ipaddress.ip_network("172.16.0.0/24")), TCP, 81, 81, "ns/wide"),
             AllowEntry(IdentityRef(7), TCP, 80, 80, "ns/ident")]  # fmt: skip
    sequence = []
    for _ in range(versions):
        port80 = DirectionAllows(True, normalize_allows(
            [*fixed, *(AllowEntry(host(i), TCP, 80, 80, "ns/list") for i in chosen)]))  # fmt: skip
        anyport = DirectionAllows(
            True, normalize_allows(AllowEntry(host(i), 0, 0, 65535, "ns/list") for i in chosen)
        )
        endpoints = {
            f"ns/pod{pod.index}": EndpointPolicy("ns", f"pod{pod.index}", (ip(pod.ip), ip(pod.ip6)),
                                                 port80 if pod.index == 1 else anyport, DirectionAllows())
            for pod in node.pods
        }  # fmt: skip
        sequence.append(NodePolicy(endpoints, {7: (ip("172.16.1.250"),)}))
        for _ in range(rng.randint(1, 3)):
            chosen[rng.randrange(len(chosen))] = PEERS + rng.randrange(2 * PEERS)
    return sequence


def located(node: Node, state: NodeState) -> NodeState:
    ifindexes = {f"ns/pod{pod.index}": pod.ifindex for pod in node.pods}
    endpoints = {key: replace(e, ifindex=ifindexes[key]) for key, e in state.endpoints.items()}
    return replace(state, endpoints=endpoints, node_ips=(ip(NODE_IP),),
                   pod_interfaces=frozenset(ifindexes.values()))  # fmt: skip


def verdicts(node: Node, plane: BpfDataplane) -> list[bool]:
    """Every probe judged on the maps as read back from the kernel's pins."""
    live, _ = maps.read_live(plane._module, {})  # what the pinned maps hold
    peers = [ipaddress.ip_address(f"172.16.{i // 200}.{i % 200 + 1}") for i in range(3 * PEERS + 1)]
    peers.append(ipaddress.ip_address("172.16.1.250"))
    return [
        datapath_allows(live, pod.ifindex, True, peer, TCP, port)  # type: ignore[arg-type]
        for pod in node.pods
        for peer in peers
        for port in (80, 81, 443)
    ]


def test_deltas_leave_the_kernel_maps_of_a_fresh_snapshot(node: Node) -> None:
    sequence = policies(node, 8)
    cache = DecodeCache()
    plane = BpfDataplane(node.settings())
    plane.start()
    try:
        state = apply_message(None, snapshot_message(1, sequence[0]), cache)
        plane.apply(located(node, state))
        for version in range(2, len(sequence) + 1):
            delta = delta_message(version, sequence[version - 2], sequence[version - 1])
            assert delta.delta.patch_endpoints and not delta.delta.upsert_endpoints
            state = apply_message(state, delta, cache)
            plane.apply(located(node, state))
        through_deltas = verdicts(node, plane)
    finally:
        plane.teardown()

    cidr_classes.forget()
    fresh = BpfDataplane(node.settings())
    fresh.start()
    try:
        fresh.apply(located(node, apply_message(None, snapshot_message(len(sequence), sequence[-1]))))
        from_snapshot = verdicts(node, fresh)
    finally:
        fresh.teardown()
    assert through_deltas == from_snapshot
    assert 0.1 < sum(from_snapshot) / len(from_snapshot) < 0.9  # the probes tell states apart
