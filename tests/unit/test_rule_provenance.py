"""Rule provenance (issue 24): every compiled entry names the rule it came from, through the
resolver (fresh and patched), the wire and the agent's decoding, for flow records to name the
deciding rule."""

from __future__ import annotations

from agent.api import podfence_pb2 as pb
from agent.control.encode import snapshot_message
from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    Tier,
)
from agent.model.objects import (
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
)
from agent.node.decode import apply_message
from agent.policy.resolver import Resolver
from tests.unit.model_builders import pod, sel

SHOP = Namespace("shop", {"team": "shop"})
WEB = pod("shop", "web", "10.0.0.1", app="web")
CLIENT = pod("shop", "client", "10.0.0.2", app="client")
LATE = pod("shop", "late", "10.0.0.3", app="client", version="2")  # another identity

# one peer on two rules of different ports, and a rule of another peer
TWO_RULES = NetworkPolicy(
    "shop",
    "web",
    sel(app="web"),
    frozenset({PolicyType.INGRESS, PolicyType.EGRESS}),
    ingress=(
        Rule((Peer(sel(app="client")),), (PortSpec(Protocol.TCP, 80),)),
        Rule((Peer(sel(app="client")),), (PortSpec(Protocol.TCP, 443),)),
    ),
    egress=(Rule((Peer(sel(app="client")),), (PortSpec(Protocol.UDP, 53),)),),
)


def _rules_by_port(resolver: Resolver, direction: str) -> dict[int, set[str]]:
    endpoint = resolver.node_policy("n1").endpoints["shop/web"]
    found: dict[int, set[str]] = {}
    for entry in getattr(endpoint, direction).allows:
        found.setdefault(entry.port_first, set()).add(f"{entry.policy} {entry.rule}")
    return found


def test_each_entry_names_its_rule_fresh_and_after_a_patch() -> None:
    resolver = Resolver()
    for obj in (SHOP, WEB, CLIENT, TWO_RULES):
        resolver.upsert(obj)
    expected_in = {80: {"shop/web ingress[0]"}, 443: {"shop/web ingress[1]"}}
    assert _rules_by_port(resolver, "ingress") == expected_in
    assert _rules_by_port(resolver, "egress") == {53: {"shop/web egress[0]"}}
    # a new pod joins the selector: the template is patched in place (rules.patch_plan), and the
    # new identity's entries must name the same rules as a fresh resolve does
    resolver.upsert(LATE)
    fresh = Resolver()
    for obj in (SHOP, WEB, CLIENT, LATE, TWO_RULES):
        fresh.upsert(obj)
    patched = resolver.node_policy("n1").endpoints["shop/web"]
    assert patched == fresh.node_policy("n1").endpoints["shop/web"]
    assert {(e.port_first, e.rule) for e in patched.ingress.allows} == {
        (80, "ingress[0]"),
        (443, "ingress[1]"),
    }
    assert len(patched.ingress.allows) == 4  # two identities x two rules


def test_cluster_policy_rules_are_named_by_name_else_index_and_cross_the_wire() -> None:
    everyone = ClusterPeer(namespaces=LabelSelector())
    cnp = ClusterNetworkPolicy(
        "guard",
        Tier.ADMIN,
        10,
        subject_namespaces=LabelSelector(),
        ingress=(
            ClusterRule(Action.DENY, (everyone,), (ClusterPort(Protocol.TCP, 22, 22),), name="no-ssh"),
            ClusterRule(Action.ACCEPT, (everyone,), (ClusterPort(Protocol.TCP, 80, 80),)),
        ),
    )
    resolver = Resolver()
    for obj in (SHOP, WEB, CLIENT, TWO_RULES, cnp):
        resolver.upsert(obj)
    node = resolver.node_policy("n1")
    tiered = node.endpoints["shop/web"].ingress.tiered
    assert {(e.port_first, e.policy, e.rule) for e in tiered} == {
        (22, "guard", "no-ssh"),
        (80, "guard", "ingress[1]"),
    }

    wire = pb.ControlMessage.FromString(snapshot_message(1, node).SerializeToString())
    state = apply_message(None, wire)
    endpoint = state.endpoints["shop/web"]
    assert {(a.port_first, a.rule) for a in endpoint.ingress.allows} == {
        (80, "ingress[0]"),
        (443, "ingress[1]"),
    }
    assert {(t.port_first, t.rule) for t in endpoint.ingress.tiered} == {(22, "no-ssh"), (80, "ingress[1]")}
