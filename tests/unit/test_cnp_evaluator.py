"""The tier order of the reference evaluator: named cases, then random mixes of ClusterNetworkPolicy
and NetworkPolicy against the invariants the API states (tests/data/npa/SPEC.md, section 4).

Invariants checked on random clusters and connections:
- an Admin Accept or Deny is final: adding NetworkPolicies that allow or deny everything, or
  removing every Baseline policy, never changes it;
- a NetworkPolicy decision is final: a pod isolated by a NetworkPolicy for a direction is never
  decided by the Baseline tier, and removing every Baseline policy never changes it;
- when no ClusterNetworkPolicy rule matches, the verdict is the NetworkPolicy-only verdict;
- the order among equal priorities is by name, so insertion order never changes a verdict;
- a Pass is never the deciding rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    NamespacedPods,
    Tier,
)
from agent.model.objects import (
    ContainerPort,
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
from agent.policy.evaluator import DirectionVerdict, Verdict, evaluate
from agent.policy.state import ClusterState
from tests.unit.model_builders import pod, sel

EVERYTHING = LabelSelector()
BOTH = frozenset({PolicyType.INGRESS, PolicyType.EGRESS})


def cnp(
    name: str,
    tier: Tier,
    priority: int,
    *,
    ingress: tuple[ClusterRule, ...] = (),
    egress: tuple[ClusterRule, ...] = (),
    subject: LabelSelector = EVERYTHING,
) -> ClusterNetworkPolicy:
    return ClusterNetworkPolicy(
        name, tier, priority, subject_namespaces=subject, ingress=ingress, egress=egress
    )


def tcp(port: int) -> ClusterPort:
    return ClusterPort(Protocol.TCP, port, port)


ALL_NAMESPACES = ClusterPeer(namespaces=EVERYTHING)
SHOP = Namespace("shop", {"team": "shop"})
WEB = pod("shop", "web", "10.0.0.1", app="web")
CLIENT = pod("shop", "client", "10.0.0.2", app="client")
NODE_AGENT = pod("kube-system", "agent", "192.168.0.5", host_network=True)
ALLOW_ALL_NP = NetworkPolicy("shop", "allow-all", EVERYTHING, BOTH, ingress=(Rule(),), egress=(Rule(),))
DENY_ALL_NP = NetworkPolicy("shop", "deny-all", EVERYTHING, BOTH)


def state(*objects: object) -> ClusterState:
    return ClusterState.from_objects([SHOP, WEB, CLIENT, NODE_AGENT, *objects])  # type: ignore[list-item]


# --- named cases ---------------------------------------------------------------------------------


def test_admin_deny_beats_a_namespace_allow_all() -> None:
    guard = cnp(
        "mesh-guard",
        Tier.ADMIN,
        10,
        ingress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,), (tcp(15000),), "no-proxy-admin"),),
    )
    cluster = state(guard, ALLOW_ALL_NP)
    denied = evaluate(cluster, CLIENT, WEB, Protocol.TCP, 15000)
    assert not denied.allowed
    assert denied.ingress.tier == "Admin" and denied.ingress.policies == ("mesh-guard",)
    assert denied.ingress.rule is not None and denied.ingress.rule.name == "no-proxy-admin"
    assert evaluate(cluster, CLIENT, WEB, Protocol.TCP, 8080).ingress.tier == "NetworkPolicy"


def test_admin_accept_beats_a_namespace_deny_all_but_not_the_other_side() -> None:
    accept = cnp("dns", Tier.ADMIN, 5, egress=(ClusterRule(Action.ACCEPT, (ALL_NAMESPACES,)),))
    verdict = evaluate(state(accept, DENY_ALL_NP), CLIENT, WEB, Protocol.UDP, 53)
    assert verdict.egress.allowed and verdict.egress.tier == "Admin"
    assert not verdict.ingress.allowed and verdict.ingress.tier == "NetworkPolicy"
    assert not verdict.allowed


def test_pass_hands_over_to_network_policy_then_baseline() -> None:
    passing = cnp("delegate", Tier.ADMIN, 1, ingress=(ClusterRule(Action.PASS, (ALL_NAMESPACES,)),))
    later_deny = cnp("later", Tier.ADMIN, 2, ingress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,)),))
    baseline = cnp("default-deny", Tier.BASELINE, 0, ingress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,)),))
    to_baseline = evaluate(state(passing, later_deny, baseline), CLIENT, WEB, Protocol.TCP, 80)
    assert not to_baseline.allowed and to_baseline.ingress.tier == "Baseline"
    assert [m.policy for m in to_baseline.ingress.passed] == ["delegate"]
    with_np = evaluate(state(passing, later_deny, baseline, ALLOW_ALL_NP), CLIENT, WEB, Protocol.TCP, 80)
    assert with_np.allowed and with_np.ingress.tier == "NetworkPolicy"


def test_baseline_pass_falls_to_default_allow() -> None:
    rules = (ClusterRule(Action.PASS, (ALL_NAMESPACES,)), ClusterRule(Action.DENY, (ALL_NAMESPACES,)))
    verdict = evaluate(state(cnp("b", Tier.BASELINE, 0, ingress=rules)), CLIENT, WEB, Protocol.TCP, 80)
    assert verdict.allowed and verdict.ingress.tier is None and verdict.ingress.passed


def test_equal_priorities_are_ordered_by_name() -> None:
    deny = cnp("a-deny", Tier.ADMIN, 7, ingress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,)),))
    accept = cnp("b-accept", Tier.ADMIN, 7, ingress=(ClusterRule(Action.ACCEPT, (ALL_NAMESPACES,)),))
    for order in ((deny, accept), (accept, deny)):
        verdict = evaluate(state(*order), CLIENT, WEB, Protocol.TCP, 80)
        assert not verdict.allowed and verdict.ingress.policies == ("a-deny",)
    lower = replace(accept, priority=6)
    assert evaluate(state(deny, lower), CLIENT, WEB, Protocol.TCP, 80).allowed


def test_metadata_networks_and_nodes_peers_match_by_ip() -> None:
    metadata = ClusterPeer(networks=(ipaddress.ip_network("169.254.169.254/32"),))
    guard = cnp("metadata", Tier.ADMIN, 0, egress=(ClusterRule(Action.DENY, (metadata,)),))
    assert not evaluate(state(guard), WEB, ipaddress.ip_address("169.254.169.254"), Protocol.TCP, 80).allowed
    assert evaluate(state(guard), WEB, ipaddress.ip_address("169.254.169.253"), Protocol.TCP, 80).allowed
    # namespaces peers never match a host-network pod; a networks peer does, by its IP
    everything = cnp("all", Tier.ADMIN, 0, egress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,)),))
    assert evaluate(state(everything), WEB, NODE_AGENT, Protocol.TCP, 10250).allowed
    node_net = ClusterPeer(networks=(ipaddress.ip_network("192.168.0.0/24"),))
    nodes = cnp("nodes", Tier.ADMIN, 0, egress=(ClusterRule(Action.DENY, (node_net,)),))
    assert not evaluate(state(nodes), WEB, NODE_AGENT, Protocol.TCP, 10250).allowed


def test_unknown_peers_fail_closed() -> None:
    unknown = ClusterPeer(unknown=True)
    deny = cnp("newer", Tier.ADMIN, 0, ingress=(ClusterRule(Action.DENY, (unknown,), (tcp(1),)),))
    assert not evaluate(state(deny, ALLOW_ALL_NP), CLIENT, WEB, Protocol.TCP, 80).allowed
    accept = cnp("newer", Tier.ADMIN, 0, ingress=(ClusterRule(Action.ACCEPT, (unknown,)),))
    assert evaluate(state(accept, DENY_ALL_NP), CLIENT, WEB, Protocol.TCP, 80).ingress.tier == "NetworkPolicy"


def test_domain_names_match_nothing_and_hairpin_is_not_judged() -> None:
    names = ClusterPeer(domain_names=("example.com",))
    accept = cnp("names", Tier.ADMIN, 0, egress=(ClusterRule(Action.ACCEPT, (names,)),))
    assert (
        evaluate(state(accept), WEB, ipaddress.ip_address("93.184.216.34"), Protocol.TCP, 443).egress.tier
        is None
    )
    deny = cnp("all", Tier.ADMIN, 0, ingress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,)),))
    assert evaluate(state(deny), WEB, WEB, Protocol.TCP, 80).allowed


def test_named_ports_resolve_on_the_destination_pod() -> None:
    web = replace(WEB, ports=(ContainerPort(8080, name="http"),))
    named = cnp(
        "named",
        Tier.ADMIN,
        0,
        egress=(ClusterRule(Action.DENY, (ALL_NAMESPACES,), (ClusterPort(named_port="http"),)),),
    )
    cluster = ClusterState.from_objects([SHOP, web, CLIENT, named])
    assert not evaluate(cluster, CLIENT, web, Protocol.TCP, 8080).allowed
    assert evaluate(cluster, CLIENT, web, Protocol.TCP, 80).allowed
    assert evaluate(cluster, CLIENT, web, Protocol.UDP, 8080).allowed


# --- random mixes --------------------------------------------------------------------------------

LABELS = st.sampled_from([{}, {"app": "a"}, {"app": "b"}, {"app": "a", "tier": "x"}])
SELECTORS = st.sampled_from([EVERYTHING, sel(app="a"), sel(app="b"), sel(tier="x"), sel(team="t1")])
NAMESPACES = ("n1", "n2")
PODS = [
    ("n1", "p1", "10.0.1.1"),
    ("n1", "p2", "10.0.1.2"),
    ("n2", "p3", "10.0.2.3"),
    ("n2", "p4", "10.0.2.4"),
]
PORTS = (80, 443, 8080)


@st.composite
def cluster_peers(draw: st.DrawFn, egress: bool) -> ClusterPeer:
    kinds = ["namespaces", "pods", "unknown"] + (["networks"] if egress else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "namespaces":
        return ClusterPeer(namespaces=draw(SELECTORS))
    if kind == "pods":
        return ClusterPeer(pods=NamespacedPods(draw(SELECTORS), draw(SELECTORS)))
    if kind == "networks":
        return ClusterPeer(
            networks=(
                ipaddress.ip_network(draw(st.sampled_from(["10.0.1.0/24", "10.0.0.0/8", "0.0.0.0/0"]))),
            )
        )
    return ClusterPeer(unknown=True)


@st.composite
def cluster_rules(draw: st.DrawFn, egress: bool) -> ClusterRule:
    ports = draw(
        st.lists(
            st.sampled_from(
                [tcp(80), tcp(443), ClusterPort(Protocol.TCP, 400, 9000), ClusterPort(Protocol.UDP, 80, 80)]
            ),
            max_size=2,
        )
    )
    return ClusterRule(
        action=draw(st.sampled_from(list(Action))),
        peers=tuple(draw(st.lists(cluster_peers(egress), min_size=1, max_size=2))),
        ports=tuple(ports),
    )


@st.composite
def cluster_policies(draw: st.DrawFn, index: int) -> ClusterNetworkPolicy:
    subject = draw(st.sampled_from(["namespaces", "pods"]))
    return ClusterNetworkPolicy(
        name=f"cnp-{index}",
        tier=draw(st.sampled_from(list(Tier))),
        priority=draw(st.integers(0, 3)),  # few values: ties are common
        subject_namespaces=draw(SELECTORS) if subject == "namespaces" else None,
        subject_pods=NamespacedPods(draw(SELECTORS), draw(SELECTORS)) if subject == "pods" else None,
        ingress=tuple(draw(st.lists(cluster_rules(False), max_size=2))),
        egress=tuple(draw(st.lists(cluster_rules(True), max_size=2))),
    )


@st.composite
def network_policies(draw: st.DrawFn, index: int) -> NetworkPolicy:
    def rules() -> tuple[Rule, ...]:
        peers = st.lists(
            st.builds(Peer, pod_selector=st.none() | SELECTORS, namespace_selector=st.none() | SELECTORS),
            max_size=2,
        )
        ports = st.lists(
            st.builds(PortSpec, protocol=st.just(Protocol.TCP), port=st.sampled_from(PORTS)), max_size=1
        )
        return tuple(
            draw(st.lists(st.builds(Rule, peers=peers.map(tuple), ports=ports.map(tuple)), max_size=2))
        )

    return NetworkPolicy(
        namespace=draw(st.sampled_from(NAMESPACES)),
        name=f"np-{index}",
        pod_selector=draw(SELECTORS),
        policy_types=draw(
            st.sampled_from([frozenset({PolicyType.INGRESS}), frozenset({PolicyType.EGRESS}), BOTH])
        ),
        ingress=rules(),
        egress=rules(),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[object], Pod | ipaddress.IPv4Address, Pod, Protocol, int]:
    namespaces = [Namespace(n, draw(st.sampled_from([{}, {"team": "t1"}]))) for n in NAMESPACES]
    pods = [replace(pod(ns, name, ip), labels=draw(LABELS)) for ns, name, ip in PODS]
    cnps = [draw(cluster_policies(i)) for i in range(draw(st.integers(0, 4)))]
    nps = [draw(network_policies(i)) for i in range(draw(st.integers(0, 3)))]
    sources: list[Pod | ipaddress.IPv4Address] = [*pods, ipaddress.IPv4Address("192.0.2.9")]
    src = draw(st.sampled_from(sources))
    dst = draw(st.sampled_from(pods))
    protocol = draw(st.sampled_from([Protocol.TCP, Protocol.UDP]))
    return [*namespaces, *pods, *cnps, *nps], src, dst, protocol, draw(st.sampled_from(PORTS))


def _judge(
    objects: list[object], src: Pod | ipaddress.IPv4Address, dst: Pod, protocol: Protocol, port: int
) -> Verdict:
    return evaluate(ClusterState.from_objects(objects), src, dst, protocol, port)  # type: ignore[arg-type]


def _directions(verdict: Verdict) -> tuple[DirectionVerdict, DirectionVerdict]:
    return verdict.egress, verdict.ingress


def _decision(direction: DirectionVerdict) -> tuple[object, ...]:
    return (direction.allowed, direction.tier, direction.rule)


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios())
def test_tier_order_invariants(
    scenario: tuple[list[object], Pod | ipaddress.IPv4Address, Pod, Protocol, int],
) -> None:
    objects, src, dst, protocol, port = scenario
    verdict = _judge(objects, src, dst, protocol, port)
    cnps = [o for o in objects if isinstance(o, ClusterNetworkPolicy)]
    rest = [o for o in objects if not isinstance(o, ClusterNetworkPolicy)]
    no_baseline = [
        o for o in objects if not (isinstance(o, ClusterNetworkPolicy) and o.tier is Tier.BASELINE)
    ]
    allow_all = [NetworkPolicy(ns, "zz-allow", EVERYTHING, BOTH, (Rule(),), (Rule(),)) for ns in NAMESPACES]
    deny_all = [NetworkPolicy(ns, "zz-deny", EVERYTHING, BOTH) for ns in NAMESPACES]
    with_allow = _judge([*objects, *allow_all], src, dst, protocol, port)
    with_deny = _judge([*objects, *deny_all], src, dst, protocol, port)
    without_baseline = _judge(no_baseline, src, dst, protocol, port)
    np_only = _judge(rest, src, dst, protocol, port)
    shuffled = _judge([*rest, *reversed(cnps)], src, dst, protocol, port)
    assert verdict == shuffled, "the order of equal priorities must not depend on insertion order"
    assert verdict.allowed == (verdict.egress.allowed and verdict.ingress.allowed)
    for i, direction in enumerate(_directions(verdict)):
        assert direction.rule is None or direction.rule.action is not Action.PASS
        assert all(m.action is Action.PASS for m in direction.passed)
        if direction.tier == "Admin":
            # An Admin Accept/Deny: no NetworkPolicy and no Baseline policy can change it.
            assert _decision(_directions(with_allow)[i]) == _decision(direction)
            assert _decision(_directions(with_deny)[i]) == _decision(direction)
            assert _decision(_directions(without_baseline)[i]) == _decision(direction)
        if direction.isolated:
            # Isolated by a NetworkPolicy and not decided by Admin: NetworkPolicy decides, never Baseline.
            assert direction.tier in ("Admin", "NetworkPolicy")
        if direction.tier == "NetworkPolicy":
            assert _decision(_directions(without_baseline)[i]) == _decision(direction)
            assert direction.allowed == _directions(np_only)[i].allowed
        if direction.tier == "Baseline":
            assert not direction.isolated
            assert _directions(np_only)[i].isolated is False
            assert _directions(with_allow)[i].tier in ("Admin", "NetworkPolicy")
        if direction.rule is None and not direction.passed:
            assert direction.allowed == _directions(np_only)[i].allowed
