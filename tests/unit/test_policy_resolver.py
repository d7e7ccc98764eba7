"""The resolver: state lists for the tricky semantics, then property tests.

State lists (Felix style): objects in -> expected compiled state out. Property tests: random event
sequences applied incrementally give exactly what a fresh resolver computes from the final
objects, nodes not reported dirty really did not change, and the compiled form answers every
connection the way the reference evaluator does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.objects import (
    ContainerPort,
    IPAddress,
    IPBlock,
    KubeObject,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Requirement,
    Rule,
    labels_from_dict,
)
from agent.policy.check import EGRESS, INGRESS, compiled_allows
from agent.policy.compiled import (
    IPV4_ALL,
    IPV6_ALL,
    AllowEntry,
    CidrRef,
    DirectionAllows,
    IdentityRef,
    NodePolicy,
)
from agent.policy.evaluator import evaluate
from agent.policy.resolver import Resolver, identity_id
from agent.policy.state import ClusterState
from tests.unit.model_builders import sel

IN, EG = frozenset({PolicyType.INGRESS}), frozenset({PolicyType.EGRESS})
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def pod(
    ns: str,
    name: str,
    node: str | None = "n1",
    ips: Sequence[str] = (),
    ports: tuple[ContainerPort, ...] = (),
    host_network: bool = False,
    terminated: bool = False,
    **labels: str,
) -> Pod:
    return Pod(ns, name, node, dict(labels), tuple(ip(i) for i in ips), ports, host_network, terminated)


def policy(
    ns: str, name: str, selector: LabelSelector, types: frozenset[PolicyType], **rules: Rule
) -> NetworkPolicy:
    ingress = tuple(r for k, r in sorted(rules.items()) if k.startswith("ingress"))
    egress = tuple(r for k, r in sorted(rules.items()) if k.startswith("egress"))
    return NetworkPolicy(ns, name, selector, types, ingress, egress)


def ident(ns: str, **labels: str) -> int:
    return identity_id(ns, labels_from_dict(labels))


def compile_objects(*objects: KubeObject, node: str = "n1") -> NodePolicy:
    resolver = Resolver()
    for obj in objects:
        resolver.upsert(obj)
    return resolver.node_policy(node)


def allows(*entries: AllowEntry) -> set[AllowEntry]:
    return set(entries)


BASE: tuple[KubeObject, ...] = (
    Namespace("x", {"team": "blue"}),
    Namespace("y", {"team": "red"}),
    pod("x", "a", ips=["10.0.0.1"], ports=(ContainerPort(8080, TCP, "http"),), app="a"),
    pod("x", "b", node="n2", ips=["10.0.0.2"], app="b"),
    pod("y", "b", node="n2", ips=["10.0.1.2"], ports=(ContainerPort(9090, TCP, "http"),), app="b"),
)


# ---- identities ------------------------------------------------------------------------------


def test_identity_id_is_stable_nonzero_and_order_independent() -> None:
    first = identity_id("x", (("a", "1"), ("b", "2")))
    assert first == identity_id("x", labels_from_dict({"b": "2", "a": "1"}))
    assert first != identity_id("y", (("a", "1"), ("b", "2")))
    assert first != 0
    # Pinned: every replica and agent version must derive the same number (no hash() salt).
    assert identity_id("x", ()) == 878998481475687746
    assert identity_id("shop", (("app", "web"),)) == 17340157442421852903
    assert isinstance(first, int) and 0 < first < 2**64


# ---- state lists -----------------------------------------------------------------------------


def test_unselected_pod_is_endpoint_and_not_isolated() -> None:
    compiled = compile_objects(*BASE)
    assert set(compiled.endpoints) == {"x/a"}
    endpoint = compiled.endpoints["x/a"]
    assert endpoint.ingress == DirectionAllows() and endpoint.egress == DirectionAllows()
    assert endpoint.ips == (ip("10.0.0.1"),)
    assert compiled.identities == {}


def test_peer_without_namespace_selector_means_policy_namespace() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(app="b")),))
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule))
    ingress = compiled.endpoints["x/a"].ingress
    assert ingress.isolated
    expected = AllowEntry(IdentityRef(ident("x", app="b")), 0, 0, 65535, "x/p", "ingress[0]")
    assert set(ingress.allows) == allows(expected)
    assert compiled.identities == {ident("x", app="b"): (ip("10.0.0.2"),)}


def test_namespace_and_pod_selector_in_one_peer_is_and_separate_peers_or() -> None:
    anded = Rule(peers=(Peer(pod_selector=sel(app="b"), namespace_selector=sel(team="red")),))
    ored = Rule(peers=(Peer(pod_selector=sel(app="b")), Peer(namespace_selector=sel(team="red"))))
    one = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=anded))
    assert one.endpoints["x/a"].ingress.identities == {ident("y", app="b")}
    two = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=ored))
    assert two.endpoints["x/a"].ingress.identities == {ident("x", app="b"), ident("y", app="b")}


def test_empty_selectors_select_everything() -> None:
    rule = Rule(peers=(Peer(namespace_selector=LabelSelector(), pod_selector=LabelSelector()),))
    compiled = compile_objects(*BASE, policy("x", "p", LabelSelector(), IN, ingress=rule))
    assert compiled.endpoints["x/a"].ingress.identities == {
        ident("x", app="a"),
        ident("x", app="b"),
        ident("y", app="b"),
    }


def test_namespace_selector_sees_automatic_name_label() -> None:
    rule = Rule(peers=(Peer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "y"})),))
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule))
    assert compiled.endpoints["x/a"].ingress.identities == {ident("y", app="b")}


def test_rule_without_peers_is_every_address_and_without_ports_every_protocol() -> None:
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), EG, egress=Rule()))
    assert set(compiled.endpoints["x/a"].egress.allows) == allows(
        AllowEntry(CidrRef(IPV4_ALL), 0, 0, 65535, "x/p", "egress[0]"),
        AllowEntry(CidrRef(IPV6_ALL), 0, 0, 65535, "x/p", "egress[0]"),
    )


def test_policy_with_no_rules_isolates_with_empty_allow_list() -> None:
    compiled = compile_objects(*BASE, policy("x", "deny", LabelSelector(), IN | EG))
    endpoint = compiled.endpoints["x/a"]
    assert endpoint.ingress == DirectionAllows(isolated=True) and endpoint.egress == DirectionAllows(
        isolated=True
    )


def test_ingress_rules_are_ignored_when_policy_types_is_egress_only() -> None:
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), EG, ingress=Rule()))
    endpoint = compiled.endpoints["x/a"]
    assert endpoint.ingress == DirectionAllows()
    assert endpoint.egress == DirectionAllows(isolated=True)


def test_ip_block_with_excepts_and_ports() -> None:
    block = IPBlock(net("10.0.0.0/8"), (net("10.0.1.0/24"),))
    rule = Rule(
        peers=(Peer(ip_block=block),),
        ports=(PortSpec(TCP, 80), PortSpec(UDP, 1000, 2000), PortSpec(SCTP)),
    )
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule))
    peer = CidrRef(net("10.0.0.0/8"), (net("10.0.1.0/24"),))
    assert set(compiled.endpoints["x/a"].ingress.allows) == allows(
        AllowEntry(peer, 6, 80, 80, "x/p", "ingress[0]"),
        AllowEntry(peer, 17, 1000, 2000, "x/p", "ingress[0]"),
        AllowEntry(peer, 132, 0, 65535, "x/p", "ingress[0]"),
    )


def test_sctp_only_rule_isolates_and_opens_no_tcp() -> None:
    rule = Rule(ports=(PortSpec(SCTP, 81),))
    compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule))
    ingress = compiled.endpoints["x/a"].ingress
    assert ingress.isolated
    assert {e.protocol for e in ingress.allows} == {132}
    assert not compiled_allows(compiled, "x/a", INGRESS, ip("10.0.0.2"), 6, 81)
    assert compiled_allows(compiled, "x/a", INGRESS, ip("10.0.0.2"), 132, 81)


def test_named_ingress_port_resolves_on_the_endpoint_and_drops_when_missing() -> None:
    rule = Rule(ports=(PortSpec(TCP, "http"), PortSpec(UDP, "http")))
    objects = (*BASE, pod("x", "c", ips=["10.0.0.3"], app="a"))
    compiled = compile_objects(*objects, policy("x", "p", sel(app="a"), IN, ingress=rule))
    assert {(e.protocol, e.port_first, e.port_last) for e in compiled.endpoints["x/a"].ingress.allows} == {
        (6, 8080, 8080)
    }
    # x/c has no port named http: isolated, nothing allowed.
    assert compiled.endpoints["x/c"].ingress == DirectionAllows(isolated=True)


def test_named_egress_port_resolves_per_destination_pod() -> None:
    everyone = Rule(ports=(PortSpec(TCP, "http"),))
    to_b = Rule(
        peers=(Peer(pod_selector=sel(app="b"), namespace_selector=LabelSelector()),), ports=everyone.ports
    )
    block = Rule(peers=(Peer(ip_block=IPBlock(net("10.0.1.0/24"))),), ports=everyone.ports)
    for rule, expected in (
        (everyone, {(CidrRef(net("10.0.0.1/32")), 8080), (CidrRef(net("10.0.1.2/32")), 9090)}),
        (to_b, {(CidrRef(net("10.0.1.2/32")), 9090)}),  # x/b matches but has no port named http
        (block, {(CidrRef(net("10.0.1.2/32")), 9090)}),
    ):
        compiled = compile_objects(*BASE, policy("x", "p", sel(app="a"), EG, egress=rule))
        got = {(e.peer, e.port_first) for e in compiled.endpoints["x/a"].egress.allows}
        assert got == expected, rule
        assert {e.protocol for e in compiled.endpoints["x/a"].egress.allows} == {6}


def test_policies_are_additive_and_attributed() -> None:
    p1 = policy("x", "p1", sel(app="a"), IN, ingress=Rule(ports=(PortSpec(TCP, 80),)))
    p2 = policy("x", "p2", LabelSelector(), IN, ingress=Rule(ports=(PortSpec(TCP, 443),)))
    compiled = compile_objects(*BASE, p1, p2)
    entries = compiled.endpoints["x/a"].ingress.allows
    assert {(e.policy, e.port_first) for e in entries} == {("x/p1", 80), ("x/p2", 443)}


def test_host_network_and_ipless_pods_are_not_endpoints_and_not_selected_by_peers() -> None:
    objects = (
        *BASE,
        pod("x", "host", ips=["192.168.0.10"], host_network=True, app="b"),
        pod("x", "pending", ips=[], app="c"),
    )
    rule = Rule(peers=(Peer(pod_selector=LabelSelector()),))
    compiled = compile_objects(*objects, policy("x", "p", sel(app="a"), IN, ingress=rule))
    assert set(compiled.endpoints) == {"x/a"}
    # the pending pod's identity is referenced with no IPs; the hostNetwork pod is not an identity.
    assert compiled.identities[ident("x", app="c")] == ()
    assert ip("192.168.0.10") not in {i for ips in compiled.identities.values() for i in ips}


def test_terminated_pod_is_neither_endpoint_nor_peer_and_frees_its_ip() -> None:
    """A Job's pod that Succeeded keeps its API object (and status.podIP); a new running pod on the
    same node gets the same IP. Only the running pod may claim it, under its own identity."""
    done = pod("x", "job-1", ips=["10.0.0.9"], terminated=True, app="job")
    new = pod("x", "web", ips=["10.0.0.9"], app="web")
    rule = Rule(peers=(Peer(pod_selector=LabelSelector()),))
    compiled = compile_objects(*BASE, done, new, policy("x", "p", sel(app="a"), IN, ingress=rule))
    assert set(compiled.endpoints) == {"x/a", "x/web"}
    assert compiled.endpoints["x/web"].ips == (ip("10.0.0.9"),)
    owners = [identity for identity, ips in compiled.identities.items() if ip("10.0.0.9") in ips]
    assert owners == [ident("x", app="web")]
    assert ident("x", app="job") not in compiled.identities


def test_pod_turning_succeeded_leaves_endpoints_and_peers_on_the_delta_path() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(app="b")),))
    resolver = Resolver()
    for obj in (*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule)):
        resolver.upsert(obj)
    assert resolver.node_policy("n1").identities == {ident("x", app="b"): (ip("10.0.0.2"),)}
    assert "x/b" in resolver.node_policy("n2").endpoints
    resolver.take_dirty_nodes()
    resolver.upsert(pod("x", "b", node="n2", ips=["10.0.0.2"], terminated=True, app="b"))
    assert resolver.take_dirty_nodes() == {"n1", "n2"}
    assert "x/b" not in resolver.node_policy("n2").endpoints
    assert resolver.node_policy("n1").identities == {}  # its only pod gone: no identity, no peer
    assert "x/b" not in resolver.state.pods
    # ... and a fresh resolver given the same objects (terminated pod included) agrees.
    scratch = Resolver()
    scratch.replace_all([*BASE[:3], BASE[4], pod("x", "b", node="n2", ips=["10.0.0.2"], terminated=True,
                                                 app="b"), policy("x", "p", sel(app="a"), IN, ingress=rule)])
    for node in ("n1", "n2"):
        assert scratch.node_policy(node) == resolver.node_policy(node)


def test_node_identities_only_those_referenced() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(app="b")),))
    resolver = Resolver()
    for obj in (*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule)):
        resolver.upsert(obj)
    assert set(resolver.node_policy("n1").identities) == {ident("x", app="b")}
    assert resolver.node_policy("n2").identities == {}
    assert resolver.nodes() == {"n1", "n2"}


# ---- incremental behaviour -------------------------------------------------------------------


def test_pod_ip_change_updates_identity_table_and_dirties_only_referencing_nodes() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(app="b")),))
    resolver = Resolver()
    for obj in (
        *BASE,
        pod("z", "lonely", node="n3", ips=["10.9.9.9"]),
        policy("x", "p", sel(app="a"), IN, ingress=rule),
    ):
        resolver.upsert(obj)
    for node in ("n1", "n2", "n3"):
        resolver.node_policy(node)
    resolver.take_dirty_nodes()
    resolver.upsert(pod("x", "b", node="n2", ips=["10.0.0.22"], app="b"))
    assert resolver.take_dirty_nodes() == {"n1", "n2"}
    assert resolver.node_policy("n1").identities == {ident("x", app="b"): (ip("10.0.0.22"),)}


def test_unrelated_pod_relabel_dirties_only_its_own_node() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(app="b")),))
    resolver = Resolver()
    for obj in (
        *BASE,
        pod("z", "lonely", node="n3", ips=["10.9.9.9"]),
        policy("x", "p", sel(app="a"), IN, ingress=rule),
    ):
        resolver.upsert(obj)
    before = {n: resolver.node_policy(n) for n in ("n1", "n2")}
    resolver.take_dirty_nodes()
    resolver.upsert(pod("z", "lonely", node="n3", ips=["10.9.9.9"], app="other"))
    assert resolver.take_dirty_nodes() == {"n3"}
    assert {n: resolver.node_policy(n) for n in ("n1", "n2")} == before


def test_replace_all_with_same_objects_is_clean_and_with_fewer_deletes() -> None:
    resolver = Resolver()
    resolver.replace_all(BASE)
    assert resolver.take_dirty_nodes() == {"n1", "n2"}
    resolver.replace_all(BASE)
    assert resolver.take_dirty_nodes() == set()
    resolver.replace_all(BASE[:3])
    assert resolver.take_dirty_nodes() == {"n2"}
    assert resolver.nodes() == {"n1"}
    assert resolver.node_policy("n2").endpoints == {}


def test_namespace_relabel_changes_namespace_selector_matches() -> None:
    rule = Rule(peers=(Peer(namespace_selector=sel(team="green")),))
    resolver = Resolver()
    for obj in (*BASE, policy("x", "p", sel(app="a"), IN, ingress=rule)):
        resolver.upsert(obj)
    assert resolver.node_policy("n1").endpoints["x/a"].ingress.identities == frozenset()
    resolver.take_dirty_nodes()
    resolver.upsert(Namespace("y", {"team": "green"}))
    assert resolver.take_dirty_nodes() == {"n1"}
    assert resolver.node_policy("n1").endpoints["x/a"].ingress.identities == {ident("y", app="b")}
    resolver.delete("Namespace", None, "y")  # no object: only the automatic name label is left
    assert resolver.node_policy("n1").endpoints["x/a"].ingress.identities == frozenset()


def test_identity_leaving_one_selector_stays_allowed_through_another() -> None:
    """Two peers of one policy match x/b; after a relabel only one does, and x/b must stay allowed
    (incremental template patches must not drop entries another selector still justifies)."""
    two_ways = Rule(peers=(Peer(pod_selector=sel(app="b")), Peer(namespace_selector=sel(team="blue"))))
    resolver = Resolver()
    for obj in (*BASE, policy("x", "p", sel(app="a"), IN, ingress=two_ways)):
        resolver.upsert(obj)
    assert ident("x", app="b") in resolver.node_policy("n1").endpoints["x/a"].ingress.identities
    resolver.upsert(Namespace("x", {"team": "red"}))
    after = resolver.node_policy("n1")
    assert after.endpoints["x/a"].ingress.identities == {ident("x", app="b")}
    fresh = Resolver()
    for obj in resolver.state.namespaces.values():
        fresh.upsert(obj)
    for obj in resolver.state.pods.values():
        fresh.upsert(obj)
    for obj in resolver.state.policies.values():
        fresh.upsert(obj)
    assert fresh.node_policy("n1") == after


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(8)))
def test_state_list_in_any_order_compiles_the_same(order: list[int]) -> None:
    """Felix-style replay: the same objects, upserted in any order, give the same node state."""
    objects = [
        *BASE,
        policy("x", "p1", sel(app="a"), IN, ingress=Rule(peers=(Peer(namespace_selector=sel(team="red")),))),
        policy("x", "p2", LabelSelector(), EG, egress=Rule(ports=(PortSpec(TCP, "http"),))),
        policy(
            "y", "p3", LabelSelector(), IN | EG, ingress=Rule(peers=(Peer(pod_selector=LabelSelector()),))
        ),
    ]
    expected = compile_objects(*objects, node="n1"), compile_objects(*objects, node="n2")
    shuffled = [objects[i] for i in order]
    assert (compile_objects(*shuffled, node="n1"), compile_objects(*shuffled, node="n2")) == expected
    assert expected[0].endpoints["x/a"].ingress.identities == {ident("y", app="b")}


# ---- property tests --------------------------------------------------------------------------

NAMESPACES = ("n1", "n2", "n3")
NODES = ("node-a", "node-b")
POD_NAMES = ("p0", "p1", "p2", "p3")
EXTERNAL_IPS = (ip("192.168.7.7"), ip("10.200.0.1"), ip("fd00::77"))

label_dicts = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y"]), max_size=2)
requirements = st.builds(
    Requirement,
    key=st.sampled_from(["app", "tier", "team"]),
    operator=st.sampled_from(list(Operator)),
    values=st.frozensets(st.sampled_from(["x", "y", "blue"]), min_size=1, max_size=2),
).map(lambda r: r if r.operator in (Operator.IN, Operator.NOT_IN) else Requirement(r.key, r.operator))
selectors = st.builds(
    LabelSelector,
    match_labels=label_dicts.map(labels_from_dict),
    match_expressions=st.lists(requirements, max_size=1).map(tuple),
)
namespace_selectors = st.one_of(
    st.builds(
        LabelSelector,
        match_labels=st.dictionaries(st.just("team"), st.sampled_from(["blue", "red"])).map(labels_from_dict),
    ),
    st.just(LabelSelector()),
    st.sampled_from(NAMESPACES).map(lambda n: sel(**{"kubernetes.io/metadata.name": n})),
)
cidrs = st.sampled_from(
    ["10.1.0.0/16", "10.1.1.0/24", "10.0.0.0/8", "192.168.7.0/24", "fd00::/64", "0.0.0.0/0"]
)


def _ip_block(cidr: str, excepts: list[str]) -> IPBlock:
    """An ipBlock whose excepts are strictly inside its cidr, as the API server requires."""
    block = net(cidr)
    inside = [net(e) for e in excepts if net(e).version == block.version and net(e) != block]
    return IPBlock(block, tuple(e for e in inside if e.subnet_of(block)))  # type: ignore[arg-type]


ip_blocks = st.builds(
    _ip_block,
    cidrs,
    st.lists(st.sampled_from(["10.1.1.0/24", "10.1.2.0/26", "fd00::/120"]), max_size=2, unique=True),
)
peers = st.one_of(
    st.builds(Peer, pod_selector=selectors),
    st.builds(Peer, namespace_selector=namespace_selectors),
    st.builds(Peer, pod_selector=selectors, namespace_selector=namespace_selectors),
    st.builds(Peer, ip_block=ip_blocks),
)
port_specs = st.one_of(
    st.builds(PortSpec, protocol=st.sampled_from(list(Protocol)), port=st.sampled_from([80, 53, None])),
    st.builds(PortSpec, protocol=st.just(TCP), port=st.just(50), end_port=st.just(90)),
    st.builds(PortSpec, protocol=st.sampled_from([TCP, UDP]), port=st.sampled_from(["http", "dns"])),
)
rules = st.builds(
    Rule, peers=st.lists(peers, max_size=2).map(tuple), ports=st.lists(port_specs, max_size=2).map(tuple)
)
policy_types = st.sampled_from([IN, EG, IN | EG])
policies = st.builds(
    NetworkPolicy,
    namespace=st.sampled_from(NAMESPACES),
    name=st.sampled_from(["pa", "pb", "pc"]),
    pod_selector=selectors,
    policy_types=policy_types,
    ingress=st.lists(rules, max_size=2).map(tuple),
    egress=st.lists(rules, max_size=2).map(tuple),
)
container_ports = st.lists(
    st.sampled_from(
        [
            ContainerPort(80, TCP, "http"),
            ContainerPort(8080, TCP, "http"),
            ContainerPort(53, UDP, "dns"),
            ContainerPort(53, TCP, "dns"),
        ]
    ),
    max_size=2,
    unique_by=lambda p: (p.name, p.protocol),
).map(tuple)


def _pod_ip(namespace: str, name: str, generation: int) -> tuple[IPAddress, ...]:
    """Unique per pod; the generation moves the pod to another address (or family, or none)."""
    index = NAMESPACES.index(namespace) * len(POD_NAMES) + POD_NAMES.index(name)
    if generation == 0:
        return (ip(f"10.1.1.{index + 1}"),)
    if generation == 1:
        return (ip(f"10.1.2.{index + 1}"),)
    if generation == 2:
        return (ip(f"fd00::{index + 1:x}"),)
    return ()


pods = st.builds(
    lambda ns, name, node, labels, generation, ports, host, terminated: Pod(
        ns, name, node, labels, _pod_ip(ns, name, generation), ports, host, terminated
    ),
    st.sampled_from(NAMESPACES),
    st.sampled_from(POD_NAMES),
    st.sampled_from([*NODES, None]),
    label_dicts,
    st.sampled_from([0, 0, 1, 2, 3]),
    container_ports,
    st.sampled_from([False, False, False, True]),
    st.sampled_from([False, False, False, False, True]),  # Succeeded/Failed, IP kept in status
)
namespaces = st.builds(
    Namespace, st.sampled_from(NAMESPACES), st.dictionaries(st.just("team"), st.sampled_from(["blue", "red"]))
)
Event = tuple[str, object]
events = st.one_of(
    st.tuples(st.just("upsert"), namespaces),
    st.tuples(st.just("upsert"), namespaces),  # twice: relabels are the rarest, subtlest events
    st.tuples(st.just("upsert"), pods),
    st.tuples(st.just("upsert"), policies),
    st.tuples(st.just("delete"), st.tuples(st.just("Namespace"), st.none(), st.sampled_from(NAMESPACES))),
    st.tuples(
        st.just("delete"), st.tuples(st.just("Pod"), st.sampled_from(NAMESPACES), st.sampled_from(POD_NAMES))
    ),
    st.tuples(
        st.just("delete"),
        st.tuples(st.just("NetworkPolicy"), st.sampled_from(NAMESPACES), st.sampled_from(["pa", "pb", "pc"])),
    ),
)


# A populated starting cluster, so random events mostly hit pods that policies select.
initial_objects = st.tuples(
    st.lists(namespaces, max_size=3),
    st.lists(pods, min_size=6, max_size=12),
    st.lists(policies, min_size=1, max_size=4),
).map(lambda parts: [("upsert", obj) for part in parts for obj in part])


def _all_objects(state: ClusterState) -> list[KubeObject]:
    return [*state.namespaces.values(), *state.pods.values(), *state.policies.values()]


def _apply(resolver: Resolver, event: Event) -> None:
    kind, payload = event
    if kind == "upsert":
        resolver.upsert(payload)  # type: ignore[arg-type]
    else:
        resolver.delete(*payload)  # type: ignore[misc]


def _key(obj: KubeObject) -> tuple[str, str, str]:
    return (type(obj).__name__, getattr(obj, "namespace", "") or "", obj.name)


def _track(objects: dict[tuple[str, str, str], KubeObject], event: Event) -> None:
    """The objects a source holds after `event`: terminated pods included, as the API keeps them."""
    kind, payload = event
    if kind == "upsert":
        assert isinstance(payload, Namespace | Pod | NetworkPolicy)
        objects[_key(payload)] = payload
    else:
        assert isinstance(payload, tuple)
        kind_name, namespace, name = payload
        objects.pop((kind_name, namespace or "", name), None)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    initial_objects,
    st.lists(events, min_size=1, max_size=20),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_incremental_equals_from_scratch(
    initial: list[Event], sequence: list[Event], read_between: list[bool]
) -> None:
    incremental = Resolver()
    objects: dict[tuple[str, str, str], KubeObject] = {}
    last_seen: dict[str, NodePolicy] = {}
    for event, read in zip(initial + sequence, read_between[:1] * len(initial) + read_between, strict=False):
        _apply(incremental, event)
        _track(objects, event)
        if read:  # reading caches results; later events must invalidate exactly what changed
            dirty = incremental.take_dirty_nodes()
            for node in NODES:
                current = incremental.node_policy(node)
                if node not in dirty and node in last_seen:
                    assert current == last_seen[node], f"{node} changed but was not reported dirty"
                last_seen[node] = current
    scratch = Resolver()
    for obj in objects.values():
        scratch.upsert(obj)
    assert incremental.nodes() == scratch.nodes()
    for node in NODES:
        assert incremental.node_policy(node) == scratch.node_policy(node), node
    assert not any(p.terminated for p in incremental.state.pods.values())
    # replace_all from an empty resolver and as a resync of the incremental one agree too.
    resynced = Resolver()
    resynced.replace_all(list(objects.values()))
    incremental.replace_all(list(objects.values()))
    assert incremental.take_dirty_nodes() <= set(NODES)
    for node in NODES:
        assert resynced.node_policy(node) == scratch.node_policy(node)


@PROPERTY
@given(initial_objects, st.lists(events, max_size=10))
def test_compiled_form_agrees_with_evaluator(initial: list[Event], sequence: list[Event]) -> None:
    resolver = Resolver()
    for event in initial + sequence:
        _apply(resolver, event)
    state = resolver.state
    compiled = {node: resolver.node_policy(node) for node in NODES}
    addressable: list[Pod | IPAddress] = [p for p in state.pods.values() if p.ips]
    addressable.extend(EXTERNAL_IPS)
    probes = ((TCP, 80), (TCP, 8080), (TCP, 60), (UDP, 53), (SCTP, 80), (1, 0))

    def address(endpoint: Pod | IPAddress) -> IPAddress:
        return endpoint.ips[0] if isinstance(endpoint, Pod) else endpoint

    def has_policy(endpoint: Pod | IPAddress) -> bool:
        return isinstance(endpoint, Pod) and not endpoint.host_network

    def local(endpoint: Pod | IPAddress) -> NodePolicy | None:
        """The NodePolicy enforcing `endpoint`, None if no node enforces anything for it."""
        if isinstance(endpoint, Pod) and endpoint.node_name and has_policy(endpoint):
            return compiled[endpoint.node_name]
        return None

    for src in addressable:
        for dst in addressable:
            if src is dst:
                continue
            for protocol, port in probes:
                verdict = evaluate(state, src, dst, protocol, port)
                number = protocol.number if isinstance(protocol, Protocol) else protocol
                src_node, dst_node = local(src), local(dst)
                if src_node is not None:
                    assert isinstance(src, Pod)
                    got = compiled_allows(src_node, src.key, EGRESS, address(dst), number, port)
                    assert got == verdict.egress.allowed, (src, dst, protocol, port, verdict)
                elif not has_policy(src):
                    assert not verdict.egress.isolated
                if dst_node is not None:
                    assert isinstance(dst, Pod)
                    got = compiled_allows(dst_node, dst.key, INGRESS, address(src), number, port)
                    assert got == verdict.ingress.allowed, (src, dst, protocol, port, verdict)
                elif not has_policy(dst):
                    assert not verdict.ingress.isolated
