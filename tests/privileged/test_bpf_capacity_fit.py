"""One tenant's oversized policy on the real eBPF dataplane (issue 21 item 9).

With small maps, tenant A adds a policy whose CIDRs x port prefixes cannot fit. It must be
rejected alone: the pod it selects stays isolated (its allows are gone, nothing opens), and tenant
B's later revocation still takes effect, checked with real traffic and the real map contents.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest

from agent.dataplane.bpf.dataplane import BpfDataplane
from agent.dataplane.bpf.settings import BpfSettings
from agent.dataplane.bpf.telemetry import count_entries
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState
from tests.privileged.bpf_netns import NODE_IP, Node, Pod, ip

pytestmark = pytest.mark.needs("nsenter", "bpffs")  # and root (conftest.py)

TCP = 6
IDENTITY_OF_POD = {1: 101, 2: 102, 3: 103}
POLICY_MAX = 64  # entries of pf_policy (and of pf_policy_exact)


@pytest.fixture
def node() -> Iterator[Node]:
    lab = Node().create(3)
    try:
        for pod in lab.pods:
            lab.serve(pod, 8080)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def plane(node: Node) -> Iterator[BpfDataplane]:
    dataplane = BpfDataplane(
        BpfSettings(pin_dir=node.pin_dir, netns=node.netns, state_file=node.state_file, policy_max=POLICY_MAX)
    )
    dataplane.start()
    try:
        yield dataplane
    finally:
        dataplane.teardown()


def from_pod(pod: Pod, policy: str) -> Allow:
    return Allow(IdentityPeer(IDENTITY_OF_POD[pod.index]), TCP, 8080, 8080, policy)


def huge_allows(around: Pod) -> tuple[Allow, ...]:
    """Eight CIDR classes (one holding `around`) x ports 1-65000 (26 prefixes): ~200 entries."""
    cidrs = [f"{around.ip}/32"] + [f"172.16.{i}.0/24" for i in range(7)]
    return tuple(
        Allow(CidrPeer(ipaddress.ip_network(cidr)), TCP, 1, 65000, "tenant-a/huge") for cidr in cidrs
    )


def node_state(
    node: Node, version: int, a_ingress: tuple[Allow, ...], b_ingress: tuple[Allow, ...]
) -> NodeState:
    a, b, c = node.pods

    def endpoint(pod: Pod, ingress: tuple[Allow, ...] | None) -> Endpoint:
        return Endpoint(
            key=f"tenant-{'abc'[pod.index - 1]}/pod{pod.index}",
            ips=(ip(pod.ip), ip(pod.ip6)),
            ingress=DirectionPolicy(True, ingress) if ingress is not None else DirectionPolicy(),
            ifindex=pod.ifindex,
        )

    return NodeState(
        version=version,
        endpoints={e.key: e for e in (endpoint(a, a_ingress), endpoint(b, b_ingress), endpoint(c, None))},
        identities={IDENTITY_OF_POD[p.index]: (ip(p.ip), ip(p.ip6)) for p in node.pods},
        node_ips=(ip(NODE_IP),),
        pod_interfaces=frozenset(p.ifindex for p in node.pods),
    )


def test_an_oversized_policy_is_rejected_alone_and_others_keep_applying(
    node: Node, plane: BpfDataplane
) -> None:
    a, b, c = node.pods
    a_base = (from_pod(b, "tenant-a/base"),)
    b_web = (from_pod(a, "tenant-b/web"), from_pod(c, "tenant-b/web"))
    plane.apply(node_state(node, 1, a_base, b_web))
    assert c.tcp(b.ip, 8080) and b.tcp(a.ip, 8080) and not c.tcp(a.ip, 8080)

    # tenant A adds a policy that cannot fit: it alone is left out
    plane.apply(node_state(node, 2, a_base + huge_allows(c), b_web))
    # fail closed: a stays isolated, the huge policy's allow of c is not in force
    assert not c.tcp(a.ip, 8080)
    assert b.tcp(a.ip, 8080)  # tenant A's other policy still is
    assert set(plane.rejected_policies) == {"tenant-a/huge"}
    assert plane.rejected_policies["tenant-a/huge"].table in ("pf_policy", "pf_policy_exact")

    # tenant B revokes c's allow while A's policy is still too big: the revocation takes effect
    plane.apply(node_state(node, 3, a_base + huge_allows(c), (from_pod(a, "tenant-b/web"),)))
    assert not c.tcp(b.ip, 8080)
    assert a.tcp(b.ip, 8080)
    assert set(plane.rejected_policies) == {"tenant-a/huge"}
    # the kernel's maps hold no entry of the rejected policy (its ranges would be LPM entries),
    # and the others' single ports (a <- b, b <- a)
    assert count_entries(plane._module[b"pf_policy"]) == 0
    assert count_entries(plane._module[b"pf_policy_exact"]) == 2

    # tenant A fixes its policy: it is enforced, nothing is rejected any more
    fixed = (Allow(CidrPeer(ipaddress.ip_network(f"{c.ip}/32")), TCP, 8080, 8080, "tenant-a/huge"),)
    plane.apply(node_state(node, 4, a_base + fixed, (from_pod(a, "tenant-b/web"),)))
    assert plane.rejected_policies == {}
    assert c.tcp(a.ip, 8080) and not c.tcp(b.ip, 8080)


def test_a_policy_that_fits_only_once_its_old_entries_are_gone_is_not_rejected(
    node: Node, plane: BpfDataplane
) -> None:
    a, _b, c = node.pods
    tcp = huge_allows(c)[:2]  # 2 classes x 24 LPM entries
    udp = tuple(dataclasses.replace(allow, protocol=17) for allow in tcp)
    plane.apply(node_state(node, 1, tcp, (from_pod(a, "tenant-b/web"),)))
    assert count_entries(plane._module[b"pf_policy"]) == 48
    # the update holds 48 old + 48 new entries at its fullest (> 64): the first pass leaves the
    # policy out, the second, from the state it wrote, has room for it
    plane.apply(node_state(node, 2, udp, (from_pod(a, "tenant-b/web"),)))
    assert plane.rejected_policies == {}
    assert count_entries(plane._module[b"pf_policy"]) == 48
    assert not c.tcp(a.ip, 8080)  # the UDP allow admits no TCP: a stays isolated
