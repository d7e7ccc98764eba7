"""The resolver's graph parts on their own: state lists (input in -> the part's output out).

The resolver tests (test_policy_resolver.py) check the whole graph against a fresh resolver and
the evaluator; these pin the contract of single parts where it can be stated without the others:
the pure rule derivations, the selector index's matches and the changes it reports, and the
per-node identity table's reference counting.
"""

from __future__ import annotations

import ipaddress

import pytest

from agent.model.objects import (
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    labels_from_dict,
)
from agent.policy.compiled import PORT_MAX, PORT_MIN, PROTOCOL_ANY, DirectionAllows, EndpointPolicy
from agent.policy.graph.identities import IdentityIndex, pod_identity
from agent.policy.graph.nodes import NodeOutputs
from agent.policy.graph.rules import (
    NamedEgressDeps,
    SelectorKey,
    named_egress_deps,
    patch_plan,
    port_ranges,
)
from agent.policy.graph.selectors import SelectorIndex
from agent.policy.state import ClusterState
from tests.unit.model_builders import pod

TCP, UDP = Protocol.TCP, Protocol.UDP
BOTH = frozenset({PolicyType.INGRESS, PolicyType.EGRESS})
APP_A = LabelSelector(match_labels=labels_from_dict({"app": "a"}))
BLUE = LabelSelector(match_labels=labels_from_dict({"team": "blue"}))
CIDR = IPBlock(ipaddress.ip_network("10.0.0.0/8"))


def policy(
    *, ingress: tuple[Rule, ...] = (), egress: tuple[Rule, ...] = (), types: frozenset[PolicyType] = BOTH
) -> NetworkPolicy:
    return NetworkPolicy("x", "p", LabelSelector(), types, ingress, egress)


# ---- rules: pure derivations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (Rule(), ((PROTOCOL_ANY, PORT_MIN, PORT_MAX),)),
        (Rule(ports=(PortSpec(UDP),)), ((UDP.number, PORT_MIN, PORT_MAX),)),
        (
            Rule(ports=(PortSpec(TCP, 80, 90), PortSpec(TCP, 443))),
            ((TCP.number, 80, 90), (TCP.number, 443, 443)),
        ),
        (Rule(ports=(PortSpec(TCP, "http"),)), ()),  # named ports are resolved later, not ranges
    ],
)
def test_port_ranges(rule: Rule, expected: tuple[tuple[int, int, int], ...]) -> None:
    assert port_ranges(rule) == expected


OWN_A: SelectorKey = ("x", None, APP_A)
BLUE_ANY: SelectorKey = (None, BLUE, None)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # a selector used on one direction: its identities land on that direction's port ranges
        (
            policy(ingress=(Rule((Peer(APP_A),), (PortSpec(TCP, 80),)),)),
            {OWN_A: ((True, ((TCP.number, 80, 80),), "ingress[0]"),)},
        ),
        # one selector on both directions, two slots; ipBlock peers have no slot
        (
            policy(
                ingress=(Rule((Peer(APP_A), Peer(ip_block=CIDR))),),
                egress=(Rule((Peer(APP_A),), (PortSpec(UDP, 53),)),),
            ),
            {
                OWN_A: (
                    (True, ((PROTOCOL_ANY, PORT_MIN, PORT_MAX),), "ingress[0]"),
                    (False, ((UDP.number, 53, 53),), "egress[0]"),
                )
            },
        ),
        # paired with a named port anywhere: no patching, the template is recomputed
        (
            policy(
                ingress=(Rule((Peer(APP_A),), (PortSpec(TCP, 80),)),),
                egress=(Rule((Peer(APP_A),), (PortSpec(TCP, "http"),)),),
            ),
            {OWN_A: None},
        ),
        # rules of a direction the policy does not enforce leave an empty slot list
        (
            policy(
                ingress=(Rule((Peer(namespace_selector=BLUE),)),),
                types=frozenset({PolicyType.EGRESS}),
            ),
            {},
        ),
    ],
)
def test_patch_plan(given: NetworkPolicy, expected: dict[SelectorKey, object]) -> None:
    assert patch_plan(given) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (policy(egress=(Rule((Peer(APP_A),), (PortSpec(TCP, 80),)),)), None),
        (
            policy(egress=(Rule((Peer(APP_A),), (PortSpec(TCP, "http"),)),)),
            NamedEgressDeps(frozenset({("http", TCP)}), frozenset({OWN_A}), any_pod=False),
        ),
        (
            policy(egress=(Rule((Peer(ip_block=CIDR), Peer(None, BLUE)), (PortSpec(UDP, "dns"),)),)),
            NamedEgressDeps(frozenset({("dns", UDP)}), frozenset({BLUE_ANY}), any_pod=True),
        ),
        (
            policy(egress=(Rule(ports=(PortSpec(TCP, "http"),)),)),
            NamedEgressDeps(frozenset({("http", TCP)}), frozenset(), True),
        ),
        # ingress-only policies have no named egress dependencies, whatever their egress rules say
        (policy(egress=(Rule(ports=(PortSpec(TCP, "http"),)),), types=frozenset({PolicyType.INGRESS})), None),
    ],
)
def test_named_egress_deps(given: NetworkPolicy, expected: NamedEgressDeps | None) -> None:
    assert named_egress_deps(given) == expected


# ---- selectors: matches and reported changes -------------------------------------------------


class SelectorHarness:
    """Identities and selectors wired as the resolver wires them, recording reported changes."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.identities = IdentityIndex(self.state)
        self.reported: list[tuple[SelectorKey, set[int], set[int]]] = []
        self.selectors = SelectorIndex(
            self.state, self.identities, lambda s, a, r: self.reported.append((s, a, r))
        )

    def add_pod(self, p: Pod) -> int:
        self.state.pods[p.key] = p
        identity = pod_identity(p)
        assert identity is not None
        if self.identities.add_member(p.key, identity):
            self.selectors.ensure_known_namespace(p.namespace)
            self.identities.register(identity, p)
            self.selectors.identity_appeared(identity, p)
        return identity

    def remove_pod(self, p: Pod) -> None:
        del self.state.pods[p.key]
        identity = pod_identity(p)
        assert identity is not None
        namespace = self.identities.remove_member(p.key, identity)
        if namespace is not None:
            self.selectors.identity_vanished(identity, namespace)

    def relabel_namespace(self, ns: Namespace) -> None:
        self.selectors.ensure_known_namespace(ns.name)
        self.state.namespaces[ns.name] = ns
        self.selectors.namespace_relabelled(ns.name, self.state.namespace_labels(ns.name))

    def take(self) -> list[tuple[SelectorKey, set[int], set[int]]]:
        reported, self.reported = self.reported, []
        return reported


def test_selector_index_state_list() -> None:
    h = SelectorHarness()
    a1 = h.add_pod(pod("x", "a1", "10.0.0.1", app="a"))
    h.selectors.acquire(OWN_A, "x/p")
    h.selectors.acquire(BLUE_ANY, "x/p")
    # a new selector reports the identities already in scope; "x" has no team label yet
    assert h.selectors.matches == {OWN_A: {a1}, BLUE_ANY: set()}
    assert h.take() == [(OWN_A, {a1}, set())]

    # a second pod of the same identity changes no match
    h.add_pod(pod("x", "a2", "10.0.0.2", app="a"))
    assert h.take() == []

    # a namespace entering a namespace selector's scope brings its identities
    h.relabel_namespace(Namespace("x", {"team": "blue"}))
    assert h.selectors.matches[BLUE_ANY] == {a1}
    assert h.take() == [(BLUE_ANY, {a1}, set())]
    assert h.selectors.in_scope("x") == {OWN_A, BLUE_ANY}

    # a new identity outside the pod selector joins only the namespace selector
    b = h.add_pod(pod("x", "b", "10.0.0.3", app="b"))
    assert h.take() == [(BLUE_ANY, {b}, set())]

    # an identity vanishes only with its last pod
    h.remove_pod(pod("x", "a2", "10.0.0.2", app="a"))
    assert h.take() == []
    h.remove_pod(pod("x", "a1", "10.0.0.1", app="a"))
    assert sorted(h.take(), key=repr) == sorted([(OWN_A, set(), {a1}), (BLUE_ANY, set(), {a1})], key=repr)

    # leaving the scope takes the namespace's identities away; releasing drops the selector
    h.relabel_namespace(Namespace("x", {"team": "red"}))
    assert h.take() == [(BLUE_ANY, set(), {b})]
    h.selectors.release(BLUE_ANY, "x/p")
    h.selectors.release(OWN_A, "x/p")
    assert h.selectors.matches == {} and h.selectors.in_scope("x") == set()


def test_selector_shared_by_two_policies_lives_until_the_last_release() -> None:
    h = SelectorHarness()
    a = h.add_pod(pod("x", "a", "10.0.0.1", app="a"))
    h.selectors.acquire(OWN_A, "x/p")
    h.selectors.acquire(OWN_A, "x/q")
    assert h.take() == [(OWN_A, {a}, set())]  # matched once, not once per user
    assert h.selectors.users(OWN_A) == {"x/p", "x/q"}
    h.selectors.release(OWN_A, "x/p")
    assert h.selectors.matches == {OWN_A: {a}}
    h.selectors.release(OWN_A, "x/q")
    assert h.selectors.matches == {}


# ---- nodes: the identity table -----------------------------------------------------------------


def test_node_identity_table_is_reference_counted_and_refreshed_only_where_listed() -> None:
    state = ClusterState()
    names: dict[str, frozenset[int]] = {
        "x/a": frozenset({1, 2}),
        "x/b": frozenset({2}),
        "x/c": frozenset({1}),
    }
    ips = {1: (ipaddress.ip_address("10.1.0.1"),), 2: (ipaddress.ip_address("10.1.0.2"),)}

    def compile_endpoint(p: Pod) -> tuple[EndpointPolicy, frozenset[int]]:
        return EndpointPolicy(p.namespace, p.name, p.ips, DirectionAllows(), DirectionAllows()), names[p.key]

    nodes = NodeOutputs(state, compile_endpoint, lambda identity: ips[identity])
    for p in (pod("x", "a", "10.0.0.1"), pod("x", "b", "10.0.0.2"), pod("x", "c", "10.0.0.3", node="n2")):
        state.pods[p.key] = p
        nodes.pod_moved(p.key, None, p)
    assert nodes.take_dirty() == {"n1", "n2"} and nodes.nodes() == {"n1", "n2"}
    assert nodes.node_policy("n1").identities == {1: ips[1], 2: ips[2]}
    assert nodes.node_policy("n2").identities == {1: ips[1]}

    # identity 2 changes IPs: only n1 lists it
    ips[2] = (ipaddress.ip_address("10.1.0.22"),)
    nodes.identity_ips_changed(2)
    assert nodes.take_dirty() == {"n1"}
    assert nodes.node_policy("n1").identities[2] == ips[2]

    # "x/a" stops naming identity 2; "x/b" still does, so it stays; then "x/b" leaves the node
    names["x/a"] = frozenset({1})
    nodes.mark_pod("x/a")
    assert set(nodes.node_policy("n1").identities) == {1, 2}
    old_b = state.pods.pop("x/b")
    nodes.pod_moved("x/b", old_b, None)
    compiled = nodes.node_policy("n1")
    assert set(compiled.endpoints) == {"x/a"} and set(compiled.identities) == {1}

    # a clean node returns the very same cached snapshot
    assert nodes.take_dirty() == {"n1"}
    assert nodes.node_policy("n2") is nodes.node_policy("n2")
