"""The iptables dataplane against real traffic: a node netns with three pod netns (iptables_netns.py).

Each table row is {policy, packets that must pass, packets that must be dropped}; the packets are
real TCP/UDP/ICMP/SCTP flows between the pods' network namespaces, judged by the kernel.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent.dataplane.base import CapacityError
from agent.dataplane.iptables import IptablesDataplane
from agent.dataplane.iptables.compiler import GROUP_MIN_ALLOWS
from agent.dataplane.iptables.layout import TO_POD_CHAIN
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
)
from agent.node.hookguard import HookGuard
from tests.privileged.iptables_netns import (
    CLUSTER_IP,
    NODE_IP,
    NODE_IP6,
    DataplaneWorker,
    Node,
    Pod,
    ip,
    running,
    wait_for,
)

TCP, UDP, SCTP = 6, 17, 132

pytestmark = pytest.mark.needs("iptables-legacy", "ipset")


@pytest.fixture
def dataplane(node: Node) -> Iterator[DataplaneWorker]:
    with running(node.netns, IptablesDataplane) as worker:
        yield worker


def addresses(pod: Pod) -> tuple[IPAddress, ...]:
    return (ip(pod.ip),) + ((ip(pod.ip6),) if pod.ip6 else ())


def identity_of(pod: Pod) -> int:
    return int(pod.ip.rsplit(".", 1)[1])


def node_state(
    node: Node,
    ingress: dict[int, DirectionPolicy] | None = None,
    egress: dict[int, DirectionPolicy] | None = None,
    *,
    version: int = 1,
    unclaimed: tuple[int, ...] = (),
    extra_identity_ips: dict[int, tuple[str, ...]] | None = None,
) -> NodeState:
    """Pods 1..3 as endpoints (pod i is identity i), except the `unclaimed` pod numbers."""
    ingress, egress = ingress or {}, egress or {}
    endpoints = {}
    for number, pod in enumerate(node.pods, start=1):
        if number in unclaimed:
            continue
        key = f"default/pod{number}"
        endpoints[key] = Endpoint(
            key,
            addresses(pod),
            ingress.get(number, DirectionPolicy()),
            egress.get(number, DirectionPolicy()),
            pod.ifindex,
        )
    identities: dict[int, tuple[IPAddress, ...]] = {identity_of(p): addresses(p) for p in node.pods}
    for identity, extra in (extra_identity_ips or {}).items():
        identities[identity] = identities.get(identity, ()) + tuple(ip(e) for e in extra)
    return NodeState(
        version=version,
        endpoints=endpoints,
        identities=identities,
        node_ips=(ip(NODE_IP), ip(NODE_IP6)),
        pod_interfaces=frozenset(p.ifindex for p in node.pods),
    )


def isolated(*allows: Allow) -> DirectionPolicy:
    return DirectionPolicy(isolated=True, allows=allows)


def from_pod(pod: Pod, protocol: int = 0, first: int = 0, last: int = 65535) -> Allow:
    return Allow(IdentityPeer(identity_of(pod)), protocol, first, last)


def cidr(
    text: str, protocol: int = 0, first: int = 0, last: int = 65535, excepts: tuple[str, ...] = ()
) -> Allow:
    peer = CidrPeer(ipaddress.ip_network(text), tuple(ipaddress.ip_network(e) for e in excepts))
    return Allow(peer, protocol, first, last)


def assert_flows(
    node: Node, expected: Sequence[tuple[str, Pod | None, str, str, int, bool]], sctp_dir: Path
) -> None:
    """Rows of (label, source pod or None for the node, kind, destination IP, port, must pass)."""
    wrong = []
    for label, source, kind, destination, port, must_pass in expected:
        extra: tuple[str, ...] = ()
        if kind == "sctp":
            target = next(p for p in node.pods if p.ip == destination)
            extra = ("--sctp-log", str(sctp_dir / f"{target.netns}.sctp"))
        passed = node.probe(source, kind, destination, port, *extra)
        if passed != must_pass:
            wrong.append(f"{label}: {'passed' if passed else 'dropped'}")
    assert not wrong, wrong


def test_ingress_and_egress_allow_lists_on_real_traffic(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, p3 = node.pods
    dataplane.call(
        "apply",
        node_state(
            node,
            ingress={2: isolated(from_pod(p1, TCP, 80, 80), from_pod(p1, UDP, 53, 53))},
            egress={3: isolated(cidr("10.1.0.0/24", TCP, 8080, 8080, excepts=("10.1.0.2/32",)))},
        ),
    )
    assert_flows(
        node,
        [
            ("p1->p2 tcp/80 allowed by identity", p1, "tcp", p2.ip, 80, True),
            ("p1->p2 tcp/8080 not in the list", p1, "tcp", p2.ip, 8080, False),
            ("p1->p2 udp/53 allowed", p1, "udp", p2.ip, 53, True),
            ("p1->p2 udp/54 not in the list", p1, "udp", p2.ip, 54, False),
            ("p1->p2 icmp not in the list", p1, "icmp", p2.ip, 0, False),
            ("p3->p2 tcp/80 other identity", p3, "tcp", p2.ip, 80, False),
            ("p2->p1 tcp/80 neither side isolated", p2, "tcp", p1.ip, 80, True),
            ("p2->p1 icmp neither side isolated", p2, "icmp", p1.ip, 0, True),
            ("node->p2 tcp/8080 node IPs always allowed", None, "tcp", p2.ip, 8080, True),
            ("p3->p1 tcp/8080 egress cidr", p3, "tcp", p1.ip, 8080, True),
            ("p3->p2 tcp/8080 egress except", p3, "tcp", p2.ip, 8080, False),
            ("p3->p1 tcp/80 egress port", p3, "tcp", p1.ip, 80, False),
            ("p3->p1 icmp egress protocol", p3, "icmp", p1.ip, 0, False),
            ("p3->node tcp/80 egress to the node is policy too", p3, "tcp", NODE_IP, 80, False),
        ],
        tmp_path,
    )
    counters = {(c.key, c.direction): c for c in dataplane.call("counters")}
    assert counters["default/pod2", "ingress"].allowed_packets > 0
    assert counters["default/pod2", "ingress"].denied_packets >= 4  # tcp/8080, udp/54, icmp, p3's tcp/80
    assert counters["default/pod3", "egress"].denied_packets > 0
    # Drops are silent: the probes above timed out rather than being refused (no RST/unreachable).
    assert "REJECT" not in node.legacy_save()


def test_ipv6_allow_lists_on_real_traffic(node: Node, dataplane: DataplaneWorker, tmp_path: Path) -> None:
    p1, p2, p3 = node.pods
    assert p1.ip6 and p2.ip6 and p3.ip6
    dataplane.call(
        "apply",
        node_state(
            node,
            ingress={2: isolated(from_pod(p1, TCP, 80, 80), from_pod(p1, UDP, 53, 53))},
            egress={3: isolated(cidr("fd00::/64", TCP, 8080, 8080, excepts=(f"{p2.ip6}/128",)))},
        ),
    )
    assert_flows(
        node,
        [
            ("v6 p1->p2 tcp/80 allowed by identity", p1, "tcp", p2.ip6, 80, True),
            ("v6 p1->p2 tcp/8080 not in the list", p1, "tcp", p2.ip6, 8080, False),
            ("v6 p1->p2 udp/53 allowed", p1, "udp", p2.ip6, 53, True),
            ("v6 p1->p2 icmp not in the list", p1, "icmp", p2.ip6, 0, False),
            ("v6 p3->p2 tcp/80 other identity", p3, "tcp", p2.ip6, 80, False),
            ("v6 p2->p1 icmp neither side isolated", p2, "icmp", p1.ip6, 0, True),
            ("v6 node->p2 tcp/8080 node IPs always allowed", None, "tcp", p2.ip6, 8080, True),
            ("v6 p3->p1 tcp/8080 egress cidr", p3, "tcp", p1.ip6, 8080, True),
            ("v6 p3->p2 tcp/8080 egress except", p3, "tcp", p2.ip6, 8080, False),
            ("v4 still judged by the v4 rules", p1, "tcp", p2.ip, 80, True),
        ],
        tmp_path,
    )


def test_many_single_port_allows_go_through_one_set_on_real_traffic(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, p3 = node.pods
    assert p2.ip6
    fillers = tuple(from_pod(p3, TCP, 1000 + i, 1000 + i) for i in range(GROUP_MIN_ALLOWS - 2))
    ingress = isolated(
        from_pod(p1, TCP, 80, 80),
        from_pod(p1, UDP, 53, 53),
        *fillers,
        cidr(f"{p3.ip}/32", TCP, 8080, 8080),
        from_pod(p3, UDP, 54, 60),  # a range: a rule of its own
    )
    dataplane.call("apply", node_state(node, ingress={2: ingress}))
    saved, saved6 = node.legacy_save(), node.legacy_save(6)
    assert "--match-set pf-g4i-" in saved and "--match-set pf-g6i-" in saved6
    assert "--dport 80 " not in saved and "--dport 54:60 " in saved
    expected = [
        ("p1->p2 tcp/80 in the set", p1, "tcp", p2.ip, 80, True),
        ("p1->p2 udp/53 in the set", p1, "udp", p2.ip, 53, True),
        ("p1->p2 tcp/8080 the port is the CIDR's, not p1's", p1, "tcp", p2.ip, 8080, False),
        ("p1->p2 udp/54 the range is p3's", p1, "udp", p2.ip, 54, False),
        ("p3->p2 tcp/8080 CIDR entry", p3, "tcp", p2.ip, 8080, True),
        ("p3->p2 tcp/80 p1's entry, not p3's", p3, "tcp", p2.ip, 80, False),
        ("p3->p2 udp/54 range rule beside the set", p3, "udp", p2.ip, 54, True),
        ("p1->p2 icmp in no entry", p1, "icmp", p2.ip, 0, False),
        ("v6 p1->p2 tcp/80 in the v6 set", p1, "tcp", p2.ip6, 80, True),
        ("v6 p1->p2 tcp/8080 not for p1", p1, "tcp", p2.ip6, 8080, False),
    ]
    assert_flows(node, expected, tmp_path)

    # p3 joins p1's identity: only the set's members change (a swap), and p3 gets p1's ports
    moved = node_state(node, ingress={2: ingress}, version=2, extra_identity_ips={identity_of(p1): (p3.ip,)})
    dataplane.call("apply", moved)
    assert node.legacy_save().count("-A PF-I") == saved.count("-A PF-I")
    assert [line for line in node.legacy_save().splitlines() if line.startswith(":PF-I")] == [
        line for line in saved.splitlines() if line.startswith(":PF-I")
    ], "the chain is unchanged"
    assert_flows(node, [("p3->p2 tcp/80 after joining p1's identity", p3, "tcp", p2.ip, 80, True)], tmp_path)
    counters = {(c.key, c.direction): c for c in dataplane.call("counters")}
    assert counters["default/pod2", "ingress"].allowed_packets > 0


def test_bridged_pods_are_filtered_with_br_netfilter_and_physdev(node: Node, tmp_path: Path) -> None:
    p1, _, _ = node.pods
    node.in_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
    b1, b2 = node.add_bridged_pod(11), node.add_bridged_pod(12)
    for pod in (b1, b2):
        node.serve(pod, tcp=(80, 8080), udp=(53,))
    worker = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call(
            "apply",
            node_state(
                node,
                ingress={5: isolated(from_pod(b1, TCP, 80, 80))},
                egress={4: isolated(cidr("10.2.0.0/24"))},
            ),
        )
        assert node.in_node("cat", "/proc/sys/net/bridge/bridge-nf-call-iptables").stdout.strip() == "1"
        assert_flows(
            node,
            [
                ("b1->b2 tcp/80 bridged, allowed", b1, "tcp", b2.ip, 80, True),
                ("b1->b2 tcp/8080 bridged, not in b2's list", b1, "tcp", b2.ip, 8080, False),
                ("b1->b2 udp/53 bridged, not in b2's list", b1, "udp", b2.ip, 53, False),
                ("p1->b2 tcp/80 routed into the bridge, other identity", p1, "tcp", b2.ip, 80, False),
                ("b1->p1 tcp/80 routed out of the bridge, egress cidr", b1, "tcp", p1.ip, 80, False),
                ("b2->b1 tcp/8080 bridged, neither side isolated", b2, "tcp", b1.ip, 8080, True),
                ("b2->p1 tcp/80 routed, neither side isolated", b2, "tcp", p1.ip, 80, True),
                ("node->b2 tcp/8080 node IPs always allowed", None, "tcp", b2.ip, 8080, True),
            ],
            tmp_path,
        )
        worker.call("teardown")
    finally:
        worker.stop()


def test_drops_are_silent_and_icmp_errors_of_allowed_flows_pass(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, _ = node.pods
    closed = 9999  # nothing listens there: the kernel answers RST / ICMP port unreachable
    assert node.probe(p1, "tcp-refused", p2.ip, closed) and node.probe(p1, "udp-refused", p2.ip, closed)
    dataplane.call(
        "apply",
        node_state(
            node,
            # p1 accepts nothing from p2; p2's RST or ICMP error must still reach p1 as RELATED/reply.
            ingress={
                1: isolated(),
                2: isolated(from_pod(p1, TCP, closed, closed), from_pod(p1, UDP, closed, closed)),
            },
        ),
    )
    assert_flows(
        node,
        [
            ("p1->p2 tcp: RST of an allowed flow", p1, "tcp-refused", p2.ip, closed, True),
            ("p1->p2 udp: ICMP port unreachable of an allowed flow", p1, "udp-refused", p2.ip, closed, True),
            ("p1->p2 tcp/8081 denied: no RST, silence", p1, "tcp-refused", p2.ip, 8081, False),
            ("p1->p2 udp/8081 denied: no ICMP error, silence", p1, "udp-refused", p2.ip, 8081, False),
        ],
        tmp_path,
    )


def test_sctp_only_rule_does_not_open_tcp_and_portless_rule_allows_icmp(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, p3 = node.pods
    dataplane.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, SCTP, 80, 80), from_pod(p3))}))
    assert_flows(
        node,
        [
            ("p1->p2 sctp/80 allowed", p1, "sctp", p2.ip, 80, True),
            ("p1->p2 sctp/81 other port", p1, "sctp", p2.ip, 81, False),
            ("p1->p2 tcp/80 an SCTP rule must not open TCP", p1, "tcp", p2.ip, 80, False),
            ("p1->p2 udp/53", p1, "udp", p2.ip, 53, False),
            ("p3->p2 icmp by a rule without ports", p3, "icmp", p2.ip, 0, True),
            ("p3->p2 tcp/8080 by a rule without ports", p3, "tcp", p2.ip, 8080, True),
            ("p3->p2 udp/54 by a rule without ports", p3, "udp", p2.ip, 54, True),
        ],
        tmp_path,
    )


def test_egress_through_a_cluster_ip_is_judged_on_the_backend(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, _ = node.pods
    node.add_cluster_ip(80, p2, 8080)
    dataplane.call("apply", node_state(node, egress={1: isolated(cidr(f"{p2.ip}/32", TCP, 8080, 8080))}))
    assert_flows(node, [("p1->ClusterIP:80 -> p2:8080", p1, "tcp", CLUSTER_IP, 80, True)], tmp_path)
    dataplane.call(
        "apply", node_state(node, version=2, egress={1: isolated(cidr(f"{CLUSTER_IP}/32", TCP, 80, 80))})
    )
    label = "allowing the ClusterIP itself is not allowing the backend"
    assert_flows(node, [(label, p1, "tcp", CLUSTER_IP, 80, False)], tmp_path)


def test_a_pod_that_changes_its_ip_is_dropped(node: Node, dataplane: DataplaneWorker, tmp_path: Path) -> None:
    p1, p2, _ = node.pods
    spoofed = "10.1.0.77"
    node.in_pod(p1, "ip", "addr", "add", f"{spoofed}/32", "dev", "eth0")
    node.in_node("ip", "route", "add", f"{spoofed}/32", "dev", p1.host_if)  # replies could come back
    assert node.probe(p1, "tcp", p2.ip, 80, "--bind", spoofed), "the lab itself must route the new IP"
    dataplane.call("apply", node_state(node))
    assert node.probe(p1, "tcp", p2.ip, 80), "p1 with its own IP"
    assert not node.probe(p1, "tcp", p2.ip, 80, "--bind", spoofed)
    assert not node.probe(p1, "udp", p2.ip, 53, "--bind", spoofed)
    counters = {(c.key, c.direction): c for c in dataplane.call("counters")}
    assert counters["default/pod1", "egress"].denied_packets > 0


def test_unknown_pod_interfaces_are_dropped_by_default(node: Node, tmp_path: Path) -> None:
    p1, _, p3 = node.pods
    for setting, must_pass in (("drop", False), ("allow", True)):
        worker = DataplaneWorker(node.netns, functools.partial(IptablesDataplane, unknown_endpoints=setting))
        try:
            worker.call("apply", node_state(node, unclaimed=(3,)))
            assert_flows(
                node,
                [
                    (f"{setting}: p1->unclaimed p3", p1, "tcp", p3.ip, 80, must_pass),
                    (f"{setting}: unclaimed p3->p1", p3, "tcp", p1.ip, 80, must_pass),
                ],
                tmp_path,
            )
            worker.call("teardown")
        finally:
            worker.stop()


def _stream_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _endpoint_chains(node: Node) -> set[str]:
    return {
        line.split()[0][1:] for line in node.legacy_save().splitlines() if line.startswith((":PF-I", ":PF-E"))
    }


def test_restart_under_traffic_keeps_established_streams_and_denials(node: Node, tmp_path: Path) -> None:
    p1, p2, p3 = node.pods
    state = node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))})
    first = DataplaneWorker(node.netns, IptablesDataplane)
    first.call("start")
    first.call("apply", state)
    chains_before = _endpoint_chains(node)
    counter_file = tmp_path / "stream"
    node.spawn(p1, "stream", p2.ip, "80", str(counter_file))
    assert wait_for(lambda: _stream_count(counter_file) > 5)

    first.kill()  # the agent dies: no close, no teardown
    assert not node.probe(p3, "tcp", p2.ip, 80), "enforcement must outlive the agent"

    second = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        second.call("start")
        assert second.call("__getattribute__", "adopted")
        before = _stream_count(counter_file)
        second.call("apply", state)
        assert _endpoint_chains(node) == chains_before, "an unchanged policy is adopted, not rebuilt"
        assert wait_for(lambda: _stream_count(counter_file) > before + 10), "the established stream stalled"
        assert not node.probe(p3, "tcp", p2.ip, 80)
        assert node.probe(p1, "tcp", p2.ip, 80)
        second.call("teardown")
    finally:
        second.stop()


@pytest.mark.parametrize("on_change", ["keep", "reset"])
def test_established_connections_on_policy_change(node: Node, tmp_path: Path, on_change: str) -> None:
    p1, p2, _ = node.pods
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(established_on_change=on_change))
    try:
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))}))
        counter_file = tmp_path / "stream"
        node.spawn(p1, "stream", p2.ip, "80", str(counter_file))
        assert wait_for(lambda: _stream_count(counter_file) > 5)
        worker.call("apply", node_state(node, version=2, ingress={2: isolated()}))
        assert not node.probe(p1, "tcp", p2.ip, 80), "new connections follow the new policy at once"
        assert _stream_still_flows(counter_file) == (on_change == "keep")
        worker.call("teardown")
    finally:
        worker.stop()


def _stream_still_flows(counter_file: Path) -> bool:
    """Whether a running stream (TCP, or UDP as one flow: one source port) still makes progress."""
    time.sleep(0.3)  # what was in flight when the policy changed still arrives
    before = _stream_count(counter_file)
    return wait_for(lambda: _stream_count(counter_file) > before + 10, timeout=2)


@pytest.mark.parametrize("on_change", ["keep", "reset"])
def test_established_udp_flow_on_policy_change(node: Node, tmp_path: Path, on_change: str) -> None:
    p1, p2, _ = node.pods
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(established_on_change=on_change))
    try:
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, UDP, 53, 53))}))
        counter_file = tmp_path / "udp-stream"
        node.spawn(p1, "udp-stream", p2.ip, "53", str(counter_file))
        assert wait_for(lambda: _stream_count(counter_file) > 5)
        worker.call("apply", node_state(node, version=2, ingress={2: isolated()}))
        assert not node.probe(p1, "udp", p2.ip, 53), "new flows follow the new policy at once"
        assert _stream_still_flows(counter_file) == (on_change == "keep")
        worker.call("teardown")
    finally:
        worker.stop()


def test_reset_cuts_udp_flows_of_a_peer_that_left_the_allowed_identity(node: Node, tmp_path: Path) -> None:
    p1, p2, _ = node.pods
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(established_on_change="reset"))
    try:
        allow = Allow(IdentityPeer(77), UDP, 53, 53)
        worker.call(
            "apply",
            node_state(node, ingress={2: isolated(allow)}, extra_identity_ips={77: (p1.ip, str(p1.ip6))}),
        )
        chains_before = _endpoint_chains(node)
        counter_file = tmp_path / "udp-stream"
        node.spawn(p1, "udp-stream", p2.ip, "53", str(counter_file))
        assert wait_for(lambda: _stream_count(counter_file) > 5)
        # The same allow list (the same chains); only p1's membership of identity 77 ends.
        worker.call("apply", node_state(node, version=2, ingress={2: isolated(allow)}))
        assert _endpoint_chains(node) == chains_before
        assert not node.probe(p1, "udp", p2.ip, 53)
        assert not _stream_still_flows(counter_file)
        worker.call("teardown")
    finally:
        worker.stop()


def test_reset_cuts_flows_whose_entry_left_a_grouped_set(node: Node, tmp_path: Path) -> None:
    p1, p2, p3 = node.pods
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(established_on_change="reset"))
    fillers = tuple(from_pod(p3, TCP, 1000 + i, 1000 + i) for i in range(GROUP_MIN_ALLOWS))
    try:
        worker.call("apply", node_state(node, ingress={2: isolated(*fillers, from_pod(p1, UDP, 53, 53))}))
        chains_before = _endpoint_chains(node)
        counter_file = tmp_path / "udp-stream"
        node.spawn(p1, "udp-stream", p2.ip, "53", str(counter_file))
        assert wait_for(lambda: _stream_count(counter_file) > 5)
        # p1's entry moves from udp/53 to udp/54: the same chain, only the set's entries change
        worker.call(
            "apply", node_state(node, version=2, ingress={2: isolated(*fillers, from_pod(p1, UDP, 54, 54))})
        )
        assert _endpoint_chains(node) == chains_before
        assert not _stream_still_flows(counter_file), "the flow the set no longer admits was cut"
        assert not node.probe(p1, "udp", p2.ip, 53)
        assert node.probe(p1, "udp", p2.ip, 54)
        worker.call("teardown")
    finally:
        worker.stop()


def test_reset_cuts_udp_flows_that_reached_the_pod_through_a_cluster_ip(node: Node, tmp_path: Path) -> None:
    p1, p2, _ = node.pods
    node.in_node(
        "iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-d", CLUSTER_IP, "-p", "udp",
        "--dport", "5353", "-j", "DNAT", "--to-destination", f"{p2.ip}:53",
    )  # fmt: skip
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(established_on_change="reset"))
    try:
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, UDP, 53, 53))}))
        counter_file = tmp_path / "udp-stream"
        node.spawn(p1, "udp-stream", CLUSTER_IP, "5353", str(counter_file))
        assert wait_for(lambda: _stream_count(counter_file) > 5)
        # The flow's original destination is the ClusterIP; only its reply names p2.
        worker.call("apply", node_state(node, version=2, ingress={2: isolated()}))
        assert not _stream_still_flows(counter_file)
        worker.call("teardown")
    finally:
        worker.stop()


def test_other_softwares_rules_survive_start_apply_and_teardown(node: Node) -> None:
    node.in_node("iptables-legacy", "-N", "FOREIGN")
    node.in_node("iptables-legacy", "-A", "FOREIGN", "-s", "192.0.2.1", "-j", "ACCEPT")
    node.in_node("iptables-legacy", "-A", "FORWARD", "-j", "FOREIGN")
    node.in_node("iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    node.in_node("ipset", "create", "foreign-set", "hash:ip")
    node.in_node("ipset", "add", "foreign-set", "192.0.2.2")

    def foreign_state() -> tuple[list[str], str]:
        save = node.legacy_save()
        rules = [line for line in save.splitlines() if "FOREIGN" in line or "--dport 22" in line]
        return rules, node.in_node("ipset", "list", "foreign-set").stdout.split("Members:")[1]

    original = foreign_state()
    assert len(original[0]) == 4
    worker = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call("start")
        assert foreign_state() == original
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(node.pods[0]))}))
        assert foreign_state() == original
        assert "PF-" in node.legacy_save()
        worker.call("teardown")
        assert foreign_state() == original
        assert "PF-" not in node.legacy_save() and "podfence" not in node.legacy_save()
        assert "pf-" not in node.in_node("ipset", "list", "-n").stdout
    finally:
        worker.stop()


def test_podfence_teardown_removes_a_stopped_agents_chains_and_sets_only(node: Node) -> None:
    node.in_node("iptables-legacy", "-A", "FORWARD", "-p", "udp", "--dport", "9", "-j", "ACCEPT")
    node.in_node("ipset", "create", "foreign-set", "hash:ip")
    worker = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call("start")
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(node.pods[0]))}))
    finally:
        worker.stop()  # the agent stopped without a teardown: its rules stay
    assert "PF-" in node.legacy_save()
    argv = [sys.executable, "-m", "agent.cli", "teardown", "--dataplane", "iptables"]
    done = node.in_node(*argv, check=False)
    assert done.returncode == 0, done.stderr
    assert "PF-" not in node.legacy_save() and "podfence" not in node.legacy_save()
    assert "--dport 9 -j ACCEPT" in node.legacy_save()
    sets = node.in_node("ipset", "list", "-n").stdout.split()
    assert "foreign-set" in sets and not any(name.startswith("pf-") for name in sets)


def test_no_allow_all_or_deny_all_window_during_50_updates(
    node: Node, dataplane: DataplaneWorker, tmp_path: Path
) -> None:
    p1, p2, _ = node.pods
    done = tmp_path / "updates-done"
    dataplane.call("apply", node_state(node, version=0, ingress={2: isolated(from_pod(p1, UDP, 53, 53))}))
    flood = node.spawn(p1, "flood", p2.ip, "53", "54", "120", "--until", str(done))
    time.sleep(0.3)  # the flood is under way before the first update
    for version in range(1, 51):
        # Every update changes p2's chain (a new rule) and the identity set (an extra member).
        extra = cidr("10.200.0.0/16", TCP, 1000 + version, 1000 + version)
        dataplane.call(
            "apply",
            node_state(
                node,
                version=version,
                ingress={2: isolated(from_pod(p1, UDP, 53, 53), extra)},
                extra_identity_ips={identity_of(p1): ("10.1.0.200",) if version % 2 else ()},
            ),
        )
    time.sleep(0.3)
    done.touch()
    out, err = flood.communicate(timeout=30)
    counts = json.loads(out)
    assert counts["rounds"] > 50, err
    assert counts["denied_echoed"] == 0, counts
    assert counts["allowed_echoed"] == counts["rounds"], counts


def test_full_ipset_is_a_capacity_error_before_any_change(node: Node) -> None:
    p1, _p2, _ = node.pods
    worker = DataplaneWorker(node.netns, lambda: IptablesDataplane(ipset_maxelem=2))
    try:
        worker.call("apply", node_state(node, ingress={2: isolated(from_pod(p1))}))
        before = node.legacy_save(), node.in_node("ipset", "save").stdout
        too_many = node_state(
            node,
            version=2,
            ingress={2: isolated(from_pod(p1, TCP, 80, 80))},
            extra_identity_ips={identity_of(p1): ("10.1.0.201", "10.1.0.202")},
        )
        with pytest.raises(CapacityError):
            worker.call("apply", too_many)
        after = node.legacy_save(), node.in_node("ipset", "save").stdout
        strip = [line for line in before[0].splitlines() if not line.startswith("#")]
        assert strip == [line for line in after[0].splitlines() if not line.startswith("#")]
        assert before[1] == after[1]
        worker.call("teardown")
    finally:
        worker.stop()


def test_start_sweeps_what_nothing_uses_and_apply_rehooks(node: Node) -> None:
    p1, p2, p3 = node.pods
    node.in_node("ipset", "create", "pf-i4-999", "hash:ip")
    node.in_node("ipset", "create", "pf-tmp-i4-999", "hash:ip")
    node.in_node("iptables-legacy", "-N", "PF-Eleftover-0")
    node.in_node(
        "iptables-legacy",
        "-A",
        "PF-Eleftover-0",
        "-m",
        "set",
        "--match-set",
        "pf-i4-999",
        "src",
        "-j",
        "DROP",
    )
    worker = DataplaneWorker(node.netns, IptablesDataplane)
    try:
        worker.call("start")
        assert "PF-Eleftover-0" not in node.legacy_save()
        assert not {"pf-i4-999", "pf-tmp-i4-999"} & set(node.in_node("ipset", "list", "-n").stdout.split())
        assert not worker.call("__getattribute__", "adopted")

        state = node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))})
        worker.call("apply", state)
        assert not node.probe(p3, "tcp", p2.ip, 80)
        node.in_node("iptables-legacy", "-F", "FORWARD")  # another tool flushes the built-in chain
        assert node.probe(p3, "tcp", p2.ip, 80), "the lab must show the hook is what filters"
        worker.call("apply", state)
        assert not node.probe(p3, "tcp", p2.ip, 80)
        worker.call("teardown")
    finally:
        worker.stop()


class _WorkerHooks:
    """The worker's dataplane as the agent's HookGuard sees it."""

    def __init__(self, worker: DataplaneWorker) -> None:
        self.worker = worker

    def repair_hooks(self) -> list[str]:
        return list(self.worker.call("repair_hooks"))


def test_a_rule_inserted_above_the_hook_is_outranked_again_within_the_check_period(
    node: Node, dataplane: DataplaneWorker
) -> None:
    p1, p2, p3 = node.pods
    dataplane.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))}))
    guard = HookGuard(_WorkerHooks(dataplane), interval_s=0.5)
    stop = threading.Event()
    checker = threading.Thread(target=guard.run, args=(stop,))
    checker.start()
    try:
        assert not node.probe(p3, "tcp", p2.ip, 80)
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            node.in_node(tool, "-I", "FORWARD", "1", "-j", "ACCEPT")  # another tool, later
        assert wait_for(lambda: guard.repairs >= 2, timeout=3), "no repair within the check period"
        assert not node.probe(p3, "tcp", p2.ip, 80)
        assert not node.probe(p3, "tcp", p2.ip6 or "", 80)
        assert node.probe(p1, "tcp", p2.ip, 80)
        for family in (4, 6):
            saved = node.legacy_save(family).splitlines()
            forward = [line for line in saved if line.startswith("-A FORWARD")]
            assert forward[0].endswith("-j PF-FWD") and forward[1] == "-A FORWARD -j ACCEPT", forward
        repairs = guard.repairs
        time.sleep(1.2)  # hooks in place: later checks change nothing
        assert guard.repairs == repairs
    finally:
        stop.set()
        checker.join(5)


def test_a_pod_with_cap_net_admin_cannot_lift_its_filters(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, _ = node.pods
    dataplane.call("apply", node_state(node, egress={1: isolated(from_pod(p2, TCP, 80, 80))}))
    assert not node.probe(p1, "tcp", p2.ip, 8080)
    # Root in its own netns: it can flush every table it sees and re-address itself; podfence's
    # rules live in the node's netns, on the host side of the veth, out of its reach.
    for tool in ("iptables-legacy", "iptables"):
        node.in_pod(p1, tool, "-P", "OUTPUT", "ACCEPT", check=False)
        node.in_pod(p1, tool, "-F", check=False)
    node.in_pod(p1, "ip", "addr", "add", "10.1.0.99/32", "dev", "eth0")
    assert not node.probe(p1, "tcp", p2.ip, 8080)
    assert not node.probe(p1, "tcp", p2.ip, 8080, "--bind", "10.1.0.99")
    assert node.probe(p1, "tcp", p2.ip, 80)


def test_counters_survive_a_policy_change(node: Node, dataplane: DataplaneWorker) -> None:
    p1, p2, _ = node.pods
    dataplane.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))}))
    assert node.probe(p1, "tcp", p2.ip, 80) and not node.probe(p1, "tcp", p2.ip, 8080)
    before = {(c.key, c.direction): c for c in dataplane.call("counters")}["default/pod2", "ingress"]
    assert before.allowed_packets > 0 and before.denied_packets > 0 and before.denied_bytes > 0
    # A new policy is a new chain: what the replaced chain counted must not vanish from the totals.
    dataplane.call("apply", node_state(node, version=2, ingress={2: isolated(from_pod(p1, TCP, 81, 81))}))
    after = {(c.key, c.direction): c for c in dataplane.call("counters")}["default/pod2", "ingress"]
    assert after.allowed_packets >= before.allowed_packets
    assert after.denied_packets >= before.denied_packets
    assert not node.probe(p1, "tcp", p2.ip, 80)
    latest = {(c.key, c.direction): c for c in dataplane.call("counters")}["default/pod2", "ingress"]
    assert latest.denied_packets > after.denied_packets


def test_a_family_the_change_does_not_touch_is_not_rewritten_and_tampering_is_repaired(
    node: Node, dataplane: DataplaneWorker
) -> None:
    """An IPv4-only change writes nothing into ip6tables (its dispatch counters keep counting:
    a rewrite would zero them); a fixed chain flushed by someone else is rebuilt by the next
    apply even when the policy did not change."""
    p1, p2, p3 = node.pods
    assert p2.ip6
    dataplane.call("apply", node_state(node, ingress={2: isolated(from_pod(p1, TCP, 80, 80))}))
    assert node.probe(p1, "tcp", p2.ip6, 80)

    def v6_dispatch_packets() -> int:
        return sum(
            int(line[1:].split(":", 1)[0])
            for line in node.in_node("ip6tables-legacy-save", "-c").stdout.splitlines()
            if line.startswith("[") and f" -A {TO_POD_CHAIN} " in line
        )

    counted = v6_dispatch_packets()
    assert counted > 0, "the lab must show the v6 dispatch counts packets"
    v4_only = isolated(from_pod(p1, TCP, 80, 80), cidr(f"{p3.ip}/32", UDP, 53, 53))
    dataplane.call("apply", node_state(node, ingress={2: v4_only}, version=2))
    assert v6_dispatch_packets() >= counted, "ip6tables was rewritten by an IPv4-only change"
    assert node.probe(p3, "udp", p2.ip, 53) and not node.probe(p3, "tcp", p2.ip, 80)

    node.in_node("ip6tables-legacy", "-F", TO_POD_CHAIN)  # another tool flushes podfence's chain
    assert node.probe(p3, "tcp", p2.ip6, 80), "the lab must show the flushed chain is what filtered"
    dataplane.call("apply", node_state(node, ingress={2: v4_only}, version=3))
    assert not node.probe(p3, "tcp", p2.ip6, 80) and node.probe(p1, "tcp", p2.ip6, 80)


def test_a_pod_interface_enslaved_after_the_apply_stays_guarded(
    node: Node, dataplane: DataplaneWorker
) -> None:
    """A CNI creates a pod's veth, then makes it a bridge port. Seen before that (no master) and
    guarded with "-i <veth>", its frames would come in through the bridge once enslaved, match
    no rule and pass until the agent noticed the new master. On a node with bridged pods the
    guard matches the bridge port too."""
    from agent.lab import wiring
    from tests.privileged.iptables_netns import BRIDGE, LAB_TCP
    from tests.privileged.iptables_netns import Pod as LabPod

    bridged = node.add_bridged_pod(5)
    node.serve(bridged, tcp=LAB_TCP)
    newcomer = LabPod(f"{node.prefix}-b9", "pfvb9", "10.2.0.9")
    node._create(newcomer.netns)
    newcomer.ifindex = wiring.add_veth(node.netns, newcomer.host_if, newcomer.netns)
    with wiring.ipr(newcomer.netns) as ipr:
        wiring.add_address(ipr, wiring.index(ipr, "eth0"), "10.2.0.9/24")
    node.pods.append(newcomer)
    unknown = len(node.pods)
    dataplane.call("apply", node_state(node, unclaimed=(unknown,)))
    with wiring.ipr(node.netns) as ipr:  # the CNI's second step, after the agent's apply
        ipr.link("set", index=newcomer.ifindex, master=wiring.index(ipr, BRIDGE))
    assert not node.probe(newcomer, "tcp", bridged.ip, LAB_TCP[0])
    dataplane.call("apply", node_state(node, version=2))  # now known, nothing isolates it
    assert node.probe(newcomer, "tcp", bridged.ip, LAB_TCP[0]), "the control: the path is open"
