"""Audit policies in the compiled form (agent.policy.staged) and on the wire (encode, node decode).

State lists in, compiled state out, as in test_policy_resolver: random event sequences where some
policies are in audit. The enforced fields must be exactly what a resolver that never heard of the
audit policies compiles (an audit policy opens and closes nothing), and each audit view exactly
what a resolver compiles with the audit policies enforced.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.api import podfence_pb2 as pb
from agent.control.encode import delta_message, snapshot_message
from agent.dataplane.types import DirectionPolicy, audit_everything
from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterRule,
    NamespacedPods,
    Tier,
)
from agent.model.objects import IPAddress, KubeObject, LabelSelector, NetworkPolicy, Pod, PolicyType, Protocol
from agent.node.decode import MalformedMessage, apply_message
from agent.policy.audit import as_enforced, audit_view
from agent.policy.check import EGRESS, INGRESS, compiled_allows
from agent.policy.compiled import AllowEntry, CidrRef, DirectionAllows, EndpointPolicy, NodePolicy
from agent.policy.evaluator import evaluate
from agent.policy.resolver import Resolver
from agent.policy.staged import StagedResolver
from agent.policy.state import ClusterState
from tests.unit.model_builders import sel
from tests.unit.test_policy_resolver import (
    EXTERNAL_IPS,
    NODES,
    PROPERTY,
    Event,
    _apply,
    events,
    initial_objects,
)

# An Admin Deny from pods labelled app=x to TCP 80 anywhere: an audit one newly denies where
# NetworkPolicy allows.
GUARD = ClusterNetworkPolicy(
    "guard",
    Tier.ADMIN,
    1,
    subject_namespaces=LabelSelector(),
    ingress=(
        ClusterRule(
            Action.DENY,
            (ClusterPeer(pods=NamespacedPods(LabelSelector(), sel(app="x"))),),
            name="not-from-x",
        ),
    ),
)


def _in_mode(event: Event, audit: bool) -> Event:
    kind, payload = event
    if kind == "upsert" and isinstance(payload, NetworkPolicy | ClusterNetworkPolicy):
        return kind, replace(payload, audit=audit)
    return event


guard_events = st.one_of(
    st.builds(lambda audit: ("upsert", replace(GUARD, audit=audit)), st.booleans()),
    st.just(("delete", ("ClusterNetworkPolicy", None, "guard"))),
)
audit_events = st.tuples(st.one_of(events, guard_events), st.booleans()).map(lambda e: _in_mode(*e))
initial_with_audit = st.tuples(initial_objects, st.lists(st.booleans(), min_size=30, max_size=30)).map(
    lambda parts: [_in_mode(event, audit) for event, audit in zip(parts[0], parts[1], strict=False)]
)


def _as_enforced_event(event: Event) -> Event:
    kind, payload = event
    if kind == "upsert" and isinstance(payload, NetworkPolicy | ClusterNetworkPolicy):
        return kind, as_enforced(payload)
    return event


def _without_audit(event: Event) -> Event:
    """`event` for a resolver that never hears of an audit policy: its upsert is a deletion."""
    kind, payload = event
    if kind == "upsert" and isinstance(payload, NetworkPolicy) and payload.audit:
        return "delete", ("NetworkPolicy", payload.namespace, payload.name)
    if kind == "upsert" and isinstance(payload, ClusterNetworkPolicy) and payload.audit:
        return "delete", ("ClusterNetworkPolicy", None, payload.name)
    return event


def _enforced_part(policy: NodePolicy) -> NodePolicy:
    def strip(direction: DirectionAllows) -> DirectionAllows:
        return replace(direction, audit=None)

    endpoints = {
        k: replace(e, ingress=strip(e.ingress), egress=strip(e.egress)) for k, e in policy.endpoints.items()
    }
    return NodePolicy(endpoints, policy.identities)


def _audit_part(policy: NodePolicy) -> dict[str, tuple[DirectionAllows, DirectionAllows]]:
    def view(direction: DirectionAllows) -> DirectionAllows:
        return direction.audit if direction.audit is not None else direction

    return {k: (view(e.ingress), view(e.egress)) for k, e in policy.endpoints.items()}


@PROPERTY
@given(
    initial_with_audit,
    st.lists(audit_events, min_size=1, max_size=16),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_enforced_fields_ignore_audit_policies_and_audit_views_enforce_them(
    initial: list[Event], sequence: list[Event], read_between: list[bool]
) -> None:
    staged, plain, enforcing = StagedResolver(), Resolver(), Resolver()
    last_seen: dict[str, NodePolicy] = {}
    for event, read in zip(initial + sequence, read_between[:1] * len(initial) + read_between, strict=False):
        _apply(staged, event)  # type: ignore[arg-type]
        _apply(plain, _without_audit(event))
        _apply(enforcing, _as_enforced_event(event))
        if read:  # a node not reported dirty must not have changed
            dirty = staged.take_dirty_nodes()
            for node in NODES:
                current = staged.node_policy(node)
                if node not in dirty and node in last_seen:
                    assert current == last_seen[node], f"{node} changed but was not reported dirty"
                last_seen[node] = current
    for node in NODES:
        got = staged.node_policy(node)
        enforced = _enforced_part(got)
        expected = plain.node_policy(node)
        # the enforced fields, byte for byte; the identity table adds what audit views name
        assert enforced.endpoints == expected.endpoints
        assert {i: got.identities[i] for i in expected.identities} == dict(expected.identities)
        assert _audit_part(got) == _audit_part(enforcing.node_policy(node))
        referenced = set().union(
            *(e.ingress.identities | e.egress.identities for e in got.endpoints.values())
        )
        assert referenced <= set(got.identities)
        if not staged.auditing:
            assert all(e.ingress.audit is None and e.egress.audit is None for e in got.endpoints.values())


@PROPERTY
@given(initial_with_audit, st.lists(audit_events, max_size=8))
def test_audit_views_agree_with_the_evaluator_on_the_audit_view(
    initial: list[Event], sequence: list[Event]
) -> None:
    staged = StagedResolver()
    for event in initial + sequence:
        _apply(staged, event)  # type: ignore[arg-type]
    state = ClusterState.from_objects(staged.objects())  # audit policies included
    audit_nodes = {node: _audit_node_policy(staged.node_policy(node)) for node in NODES}
    addressable: list[Pod | IPAddress] = [p for p in state.pods.values() if p.ips]
    addressable.extend(EXTERNAL_IPS)
    view = audit_view(state)
    for src in addressable:
        for dst in addressable:
            if src is dst:
                continue
            for protocol, port in ((Protocol.TCP, 80), (Protocol.UDP, 53), (1, 0)):
                verdict = evaluate(view, src, dst, protocol, port)
                number = protocol.number if isinstance(protocol, Protocol) else protocol
                for subject, peer, direction, expected in (
                    (src, dst, EGRESS, verdict.egress.allowed),
                    (dst, src, INGRESS, verdict.ingress.allowed),
                ):
                    if isinstance(subject, Pod) and subject.node_name and not subject.host_network:
                        peer_ip = peer.ips[0] if isinstance(peer, Pod) else peer
                        got = compiled_allows(
                            audit_nodes[subject.node_name], subject.key, direction, peer_ip, number, port
                        )
                        assert got == expected, (src, dst, protocol, port, direction)


def _audit_node_policy(policy: NodePolicy) -> NodePolicy:
    views = _audit_part(policy)
    endpoints = {k: replace(e, ingress=views[k][0], egress=views[k][1]) for k, e in policy.endpoints.items()}
    return NodePolicy(endpoints, policy.identities)


def test_switching_the_last_audit_policy_to_enforce_drops_every_audit_view() -> None:
    web = Pod("shop", "web", "node-a", {"app": "web"}, (ipaddress.ip_address("10.0.0.1"),))
    trial = NetworkPolicy("shop", "trial", sel(app="web"), frozenset({PolicyType.INGRESS}), audit=True)
    staged = StagedResolver()
    objects: list[KubeObject] = [web, trial]
    for obj in objects:
        staged.upsert(obj)
    ingress = staged.node_policy("node-a").endpoints["shop/web"].ingress
    assert not ingress.isolated and ingress.audit == DirectionAllows(isolated=True)
    staged.upsert(replace(trial, audit=False))
    assert "node-a" in staged.take_dirty_nodes() and not staged.auditing
    assert staged.node_policy("node-a").endpoints["shop/web"].ingress == DirectionAllows(isolated=True)
    staged.upsert(trial)
    staged.take_dirty_nodes()
    staged.delete("NetworkPolicy", "shop", "trial")
    assert "node-a" in staged.take_dirty_nodes() and not staged.auditing
    assert staged.node_policy("node-a").endpoints["shop/web"].ingress == DirectionAllows()


# --- on the wire ---------------------------------------------------------------------------------


def _node(ingress: DirectionAllows) -> NodePolicy:
    endpoint = EndpointPolicy("ns", "a", (ipaddress.ip_address("10.9.0.1"),), ingress, DirectionAllows())
    return NodePolicy({"ns/a": endpoint})


def _hosts(indexes: range) -> tuple[AllowEntry, ...]:
    return tuple(
        AllowEntry(CidrRef(ipaddress.ip_network(f"172.16.0.{i}/32")), 6, 80, 80, "ns/p") for i in indexes
    )


def test_the_audit_view_travels_in_snapshots_and_deltas() -> None:
    audit = DirectionAllows(True, _hosts(range(1, 3)))
    before = _node(DirectionAllows(True, _hosts(range(1, 40))))
    after = _node(DirectionAllows(True, _hosts(range(2, 41)), audit=audit))
    state = apply_message(None, snapshot_message(1, after))
    decoded = state.endpoints["ns/a"].ingress
    assert decoded.isolated and len(decoded.allows) == 39
    assert decoded.audit is not None and decoded.audit.isolated and len(decoded.audit.allows) == 2
    assert decoded.enforced == replace(decoded, audit=None)
    # a patch-sized change of the allows, with the audit view joining: the whole endpoint travels
    delta = delta_message(2, before, after)
    assert not delta.delta.patch_endpoints and len(delta.delta.upsert_endpoints) == 1
    patched = apply_message(apply_message(None, snapshot_message(1, before)), delta)
    assert patched.endpoints == state.endpoints
    # an allow change alone is a patch that keeps the audit view
    later = _node(DirectionAllows(True, _hosts(range(3, 42)), audit=audit))
    delta = delta_message(3, after, later)
    assert delta.delta.patch_endpoints
    assert apply_message(state, delta).endpoints["ns/a"].ingress.audit == decoded.audit


def test_an_audit_view_nested_in_an_audit_view_is_refused() -> None:
    message = snapshot_message(1, _node(DirectionAllows(True, audit=DirectionAllows(True))))
    message.snapshot.endpoints[0].ingress.audit.audit.isolated = True
    with pytest.raises(MalformedMessage, match="audit view inside an audit view"):
        apply_message(None, pb.ControlMessage.FromString(message.SerializeToString()))


def test_audit_all_enforces_nothing_and_keeps_everything_in_audit() -> None:
    enforced = DirectionPolicy(isolated=True)
    assert audit_everything(enforced) == DirectionPolicy(audit=enforced)
    wider = DirectionPolicy(isolated=True, audit=DirectionPolicy(isolated=True, tiered=()))
    assert audit_everything(wider) == DirectionPolicy(audit=wider.audit)
    assert audit_everything(DirectionPolicy()) == DirectionPolicy()
    assert not audit_everything(enforced).judged
