"""Random small clusters mixing ClusterNetworkPolicy and NetworkPolicy, for differential tests.

A hypothesis strategy draws two nodes, two namespaces, a handful of pods (named container ports,
one maybe host-network with its node's IP), NetworkPolicies and ClusterNetworkPolicies of both
tiers with every action, equal priorities, peers of every kind (namespaces, pods, networks,
nodes, and an unknown one that must fail closed) and ports (numbers, ranges, named). The
objects are built as the model loader returns them. `compiled_verdict` answers one connection
from the compiled NodePolicy of each pod's node, as a dataplane would; the tests compare it (and
the kernel) with agent.policy.evaluator.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import strategies as st

from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    NamespacedPods,
    Node,
    Tier,
)
from agent.model.objects import (
    ContainerPort,
    IPBlock,
    KubeObject,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
)
from agent.policy.check import EGRESS, INGRESS, compiled_allows
from agent.policy.compiled import NodePolicy

NODES = ("n1", "n2")
NODE_IPS = {"n1": "10.99.0.1", "n2": "10.99.0.2"}
NAMESPACES = ("alpha", "beta")
APPS = ("web", "db")
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1
# (protocol number, destination port) probed for every pod pair
PROBE_PORTS = ((TCP, 80), (TCP, 81), (TCP, 8080), (UDP, 53), (UDP, 80), (SCTP, 80), (ICMP, 0))


@dataclass(frozen=True)
class Scenario:
    objects: tuple[KubeObject, ...]
    nodes: tuple[str, ...] = NODES


def _labels(draw: st.DrawFn, key: str, values: tuple[str, ...]) -> LabelSelector:
    choice = draw(st.sampled_from((None, *values)))
    return LabelSelector() if choice is None else LabelSelector(((key, choice),))


def _pod(draw: st.DrawFn, index: int, local_ip: str | None = None) -> Pod:
    """Pod `index`; with `local_ip`, on node n1 at that address (a lab pod), never host-network."""
    namespace = draw(st.sampled_from(NAMESPACES))
    node = NODES[0] if local_ip else draw(st.sampled_from(NODES))
    host = local_ip is None and index == 0 and draw(st.booleans())
    ip = NODE_IPS[node] if host else local_ip or f"10.9.{index // 200}.{index % 200 + 10}"
    http = draw(st.sampled_from((80, 8080)))
    ports = (ContainerPort(http, Protocol.TCP, "http"), ContainerPort(53, Protocol.UDP, "dns"))
    return Pod(
        namespace,
        f"p{index}",
        node,
        {"app": draw(st.sampled_from(APPS))},
        (ipaddress.ip_address(ip),),
        ports if draw(st.booleans()) else (),
        host_network=host,
    )


@st.composite
def _np_port(draw: st.DrawFn) -> PortSpec:
    kind = draw(st.sampled_from(("number", "range", "named", "any")))
    protocol = draw(st.sampled_from((Protocol.TCP, Protocol.UDP)))
    if kind == "number":
        return PortSpec(protocol, draw(st.sampled_from((53, 80, 8080))))
    if kind == "range":
        return PortSpec(protocol, 79, 81)
    if kind == "named":
        return PortSpec(protocol, draw(st.sampled_from(("http", "dns"))))
    return PortSpec(protocol)


@st.composite
def _network_policy(draw: st.DrawFn, index: int) -> NetworkPolicy:
    types = draw(st.sampled_from(({PolicyType.INGRESS}, {PolicyType.EGRESS}, set(PolicyType))))

    def rules() -> tuple[Rule, ...]:
        found = []
        for _ in range(draw(st.integers(0, 2))):
            peer_kind = draw(st.sampled_from(("pods", "namespaces", "block", "none")))
            if peer_kind == "pods":
                peers: tuple[Peer, ...] = (Peer(pod_selector=_labels(draw, "app", APPS)),)
            elif peer_kind == "namespaces":
                peers = (Peer(namespace_selector=_labels(draw, "team", ("x", "y"))),)
            elif peer_kind == "block":
                peers = (
                    Peer(
                        ip_block=IPBlock(
                            ipaddress.ip_network("10.9.0.0/16"), (ipaddress.ip_network("10.9.0.10/31"),)
                        )
                    ),
                )
            else:
                peers = ()
            ports = tuple(draw(st.lists(_np_port(), max_size=2)))
            found.append(Rule(peers, ports))
        return tuple(found)

    return NetworkPolicy(
        draw(st.sampled_from(NAMESPACES)),
        f"np{index}",
        _labels(draw, "app", APPS),
        frozenset(types),
        rules() if PolicyType.INGRESS in types else (),
        rules() if PolicyType.EGRESS in types else (),
    )


@st.composite
def _cluster_peer(draw: st.DrawFn) -> ClusterPeer:
    kind = draw(st.sampled_from(("namespaces", "pods", "networks", "nodes", "unknown", "domains")))
    if kind == "namespaces":
        return ClusterPeer(namespaces=_labels(draw, "team", ("x", "y")))
    if kind == "pods":
        return ClusterPeer(pods=NamespacedPods(_labels(draw, "team", ("x", "y")), _labels(draw, "app", APPS)))
    if kind == "networks":
        nets = ("10.9.0.0/24", "10.9.0.10/32", "10.99.0.0/24", "0.0.0.0/0", "10.1.0.0/24", "10.1.0.2/32")
        net = draw(st.sampled_from(nets))
        return ClusterPeer(networks=(ipaddress.ip_network(net),))
    if kind == "nodes":
        return ClusterPeer(nodes=_labels(draw, "zone", ("a", "b")))
    if kind == "domains":
        return ClusterPeer(domain_names=("example.com",))
    return ClusterPeer(unknown=True)


@st.composite
def _cluster_port(draw: st.DrawFn) -> ClusterPort:
    kind = draw(st.sampled_from(("number", "number", "range", "named", "unknown")))
    protocol = draw(st.sampled_from((Protocol.TCP, Protocol.UDP, Protocol.SCTP)))
    if kind == "number":
        port = draw(st.sampled_from((53, 80, 8080)))
        return ClusterPort(protocol, port, port)
    if kind == "range":
        return ClusterPort(protocol, 80, 8080)
    if kind == "named":
        return ClusterPort(named_port=draw(st.sampled_from(("http", "dns"))))
    return ClusterPort(unknown=True)


@st.composite
def _cluster_policy(draw: st.DrawFn, index: int) -> ClusterNetworkPolicy:
    tier = draw(st.sampled_from(tuple(Tier)))

    def rules() -> tuple[ClusterRule, ...]:
        found = []
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(tuple(Action)))
            peers = tuple(draw(st.lists(_cluster_peer(), min_size=1, max_size=2)))
            ports = tuple(draw(st.lists(_cluster_port(), max_size=2)))
            if action is not Action.ACCEPT:  # the API allows domainNames only in Accept rules
                everyone = ClusterPeer(namespaces=LabelSelector())
                peers = tuple(p for p in peers if not p.domain_names) or (everyone,)
            found.append(ClusterRule(action, peers, ports))
        return tuple(found)

    namespaces = _labels(draw, "team", ("x", "y"))
    pods = NamespacedPods(namespaces, _labels(draw, "app", APPS)) if draw(st.booleans()) else None
    return ClusterNetworkPolicy(
        f"cnp{index}",
        tier,
        draw(st.integers(0, 2)),
        subject_namespaces=None if pods else namespaces,
        subject_pods=pods,
        ingress=rules(),
        egress=rules(),
    )


@st.composite
def scenarios(draw: st.DrawFn, max_pods: int = 5, local_ips: tuple[str, ...] = ()) -> Scenario:
    """A cluster; with `local_ips`, its first pods are those lab pods on n1, then up to two others."""
    objects: list[KubeObject] = []
    for node, zone in zip(NODES, ("a", "b"), strict=True):
        objects.append(Node(node, {"zone": zone}, (ipaddress.ip_address(NODE_IPS[node]),)))
    for namespace in NAMESPACES:
        objects.append(Namespace(namespace, {"team": draw(st.sampled_from(("x", "y")))}))
    if local_ips:
        objects += [_pod(draw, i, ip) for i, ip in enumerate(local_ips)]
        objects += [_pod(draw, len(local_ips) + i) for i in range(draw(st.integers(0, 2)))]
    else:
        objects += [_pod(draw, i) for i in range(draw(st.integers(2, max_pods)))]
    objects += [draw(_network_policy(i)) for i in range(draw(st.integers(0, 2)))]
    objects += [draw(_cluster_policy(i)) for i in range(draw(st.integers(1, 4)))]
    return Scenario(tuple(objects))


def compiled_verdict(
    policies: Mapping[str, NodePolicy], src: Pod, dst: Pod, protocol: int, port: int
) -> bool:
    """src -> dst (its first IP) judged from the compiled form of each side's node; a side that
    is no endpoint (host network) has no policy of its own."""
    allowed = True
    source = policies.get(src.node_name or "")
    if source is not None and src.key in source.endpoints:
        allowed = compiled_allows(source, src.key, EGRESS, dst.ips[0], protocol, port)
    target = policies.get(dst.node_name or "")
    if target is not None and dst.key in target.endpoints:
        allowed = allowed and compiled_allows(target, dst.key, INGRESS, src.ips[0], protocol, port)
    return allowed
