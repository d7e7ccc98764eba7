"""Per-entry deltas (issue 27): a delta carries the allow entries that leave and join an endpoint's
lists, not the lists. Applying the deltas of a sequence of node policies must give the agent the
same state as a snapshot of the last one: the same allow sets, and the same compiled kernel
state on both dataplanes (the eBPF maps' contents, the iptables chains and ipsets).
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api import podfence_pb2 as pb
from agent.control.encode import delta_message, snapshot_message
from agent.dataplane.bpf.compiler import compile_node_state
from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.layout import Interface
from agent.dataplane.types import NodeState
from agent.node.decode import DecodeCache, MalformedMessage, apply_message
from agent.policy.compiled import (
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    AllowEntry,
    CidrRef,
    DirectionAllows,
    EndpointPolicy,
    IdentityRef,
    NodePolicy,
    TieredEntry,
    normalize_allows,
)

ENDPOINTS = ("ns/a", "ns/b", "ns/c")
IDENTITIES = (11, 12, 13)


def host(index: int) -> CidrRef:
    return CidrRef(ipaddress.ip_network(f"172.16.{index // 256}.{index % 256}/32"))


# A small pool, so that lists share entries, edits hit entries others hold, and lists coincide.
PEERS = [host(i) for i in range(12)] + [
    CidrRef(ipaddress.ip_network("172.16.0.0/28")),
    CidrRef(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.1.0.0/16"),)),
    CidrRef(ipaddress.ip_network("fd00::/64")),
] + [IdentityRef(i) for i in IDENTITIES]  # fmt: skip
entries = st.builds(
    lambda peer, port, policy: AllowEntry(peer, 6 if port else 0, port, port or 65535, policy),
    st.sampled_from(PEERS),
    st.sampled_from([0, 80, 443]),
    st.sampled_from(["ns/p", "ns/q"]),
)
# ClusterNetworkPolicy entries: a patch carries NetworkPolicy allows only, so a change of these
# must travel as the whole endpoint
TIERED = (
    TieredEntry(TIER_ADMIN, 0, ACTION_DENY, host(3), 6, 80, 80, "deny-web"),
    TieredEntry(TIER_ADMIN, 1, ACTION_PASS, IdentityRef(IDENTITIES[0]), 0, policy="pass-team"),
)
tiered = st.sampled_from([(), TIERED[:1], TIERED])
directions = st.one_of(
    tiered.map(lambda t: DirectionAllows(False, (), t)),
    st.tuples(st.lists(entries, max_size=16), tiered).map(
        lambda e: DirectionAllows(True, normalize_allows(e[0]), e[1])
    ),
)


@st.composite
def edited(draw: st.DrawFn, direction: DirectionAllows) -> DirectionAllows:
    """Mostly a small edit of `direction` (what a patch says), sometimes a new list."""
    if not direction.isolated or draw(st.integers(0, 4)) == 0:
        fresh: DirectionAllows = draw(directions)
        return fresh
    allows = list(direction.allows)
    for _ in range(draw(st.integers(0, 2))):
        remove: bool = draw(st.booleans())
        if allows and remove:
            allows.pop(draw(st.integers(0, len(allows) - 1)))
        else:
            allows.append(draw(entries))
    return DirectionAllows(True, normalize_allows(allows), draw(tiered))


def endpoint(
    key: str, ips: tuple[str, ...], ingress: DirectionAllows, egress: DirectionAllows
) -> EndpointPolicy:
    namespace, name = key.split("/")
    return EndpointPolicy(namespace, name, tuple(ipaddress.ip_address(ip) for ip in ips), ingress, egress)


@st.composite
def policies(draw: st.DrawFn) -> list[NodePolicy]:
    """A sequence of node policies, each a small edit of the one before."""
    shared = draw(directions)  # endpoints selected by the same policies share the list object
    current: dict[str, EndpointPolicy] = {
        key: endpoint(key, (f"10.9.0.{n + 1}",), shared if draw(st.booleans()) else draw(directions),
                      draw(directions))
        for n, key in enumerate(ENDPOINTS)
        if draw(st.booleans())
    }  # fmt: skip
    identities = {i: (ipaddress.ip_address(f"10.8.0.{i}"),) for i in IDENTITIES}
    sequence = [NodePolicy(dict(current), dict(identities))]
    for _ in range(draw(st.integers(1, 4))):
        edits: dict[DirectionAllows, DirectionAllows] = {}
        for n, key in enumerate(ENDPOINTS):
            action = draw(st.sampled_from(["keep", "edit", "edit", "move", "toggle"]))
            old = current.get(key)
            if action == "toggle":
                if old is None:
                    current[key] = endpoint(key, (f"10.9.0.{n + 1}",), draw(directions), draw(directions))
                else:
                    del current[key]
            elif old is not None and action == "edit":
                # equal lists edited alike stay one object, as the resolver hands them out
                if old.ingress not in edits:
                    edits[old.ingress] = draw(edited(old.ingress))
                current[key] = replace(old, ingress=edits[old.ingress], egress=draw(edited(old.egress)))
            elif old is not None and action == "move":
                current[key] = replace(old, ips=(ipaddress.ip_address(f"10.9.1.{n + 1}"),))
        if draw(st.booleans()):
            identities[IDENTITIES[0]] = (ipaddress.ip_address(f"10.8.1.{len(sequence)}"),)
        sequence.append(NodePolicy(dict(current), dict(identities)))
    return sequence


def allow_sets(state: NodeState) -> dict[str, tuple[bool, frozenset[object], bool, frozenset[object]]]:
    return {
        key: (e.ingress.isolated, frozenset(e.ingress.allows), e.egress.isolated, frozenset(e.egress.allows))
        for key, e in state.endpoints.items()
    }


def located(state: NodeState) -> NodeState:
    """The state as the node layer hands it to a dataplane: every endpoint on an interface."""
    ordered = sorted(state.endpoints.items())
    endpoints = {key: replace(e, ifindex=100 + n) for n, (key, e) in enumerate(ordered)}
    interfaces = frozenset(range(100, 100 + len(ENDPOINTS)))
    return replace(state, version=0, endpoints=endpoints, pod_interfaces=interfaces)


INTERFACES = {100 + n: Interface(100 + n, f"veth{n}") for n in range(len(ENDPOINTS))}


@settings(max_examples=300, deadline=None)
@given(policies())
def test_deltas_give_the_state_and_kernel_state_of_a_snapshot(sequence: list[NodePolicy]) -> None:
    cache = DecodeCache()
    state = apply_message(None, snapshot_message(1, sequence[0]), cache)
    for version, (before, after) in enumerate(itertools.pairwise(sequence), start=2):
        # through the wire, as the agent receives it
        delta = pb.ControlMessage.FromString(delta_message(version, before, after).SerializeToString())
        state = apply_message(state, delta, cache)
    fresh = apply_message(None, snapshot_message(len(sequence), sequence[-1]))
    assert state == fresh  # lists in the same order too: a reconnect's snapshot changes nothing
    assert compile_node_state(located(state)) == compile_node_state(located(fresh))
    assert compile_state(located(state), INTERFACES) == compile_state(located(fresh), INTERFACES)


def big_policy(peers: range, tiers: tuple[TieredEntry, ...] = ()) -> NodePolicy:
    entries = (AllowEntry(host(i), 6, 80, 80, "ns/allow-list") for i in peers)
    allows = DirectionAllows(True, normalize_allows(entries), tiers)
    return NodePolicy({"ns/a": endpoint("ns/a", ("10.9.0.1",), allows, DirectionAllows())})


def test_one_peer_changed_among_ten_thousand_is_two_entries_on_the_wire() -> None:
    before, after = big_policy(range(10_000)), big_policy(range(1, 10_001))
    snapshot, delta = snapshot_message(1, before), delta_message(2, before, after)
    (patch,) = delta.delta.patch_endpoints
    assert not delta.delta.upsert_endpoints
    assert (len(patch.ingress.remove), len(patch.ingress.add)) == (1, 1)
    assert delta.ByteSize() < 200 < 100_000 < snapshot.ByteSize()
    state = apply_message(apply_message(None, snapshot), delta)
    assert allow_sets(state) == allow_sets(apply_message(None, snapshot_message(2, after)))


def test_a_change_of_cluster_policy_entries_is_never_lost_in_a_patch() -> None:
    """One allow changed (patch-sized) while an Admin Deny joins: the whole endpoint travels, and
    the agent enforces the Deny (a patch carries allows only and would drop it)."""
    before, after = big_policy(range(100)), big_policy(range(1, 101), TIERED[:1])
    delta = delta_message(2, before, after)
    assert not delta.delta.patch_endpoints
    state = apply_message(apply_message(None, snapshot_message(1, before)), delta)
    assert state == apply_message(None, snapshot_message(2, after))
    assert len(state.endpoints["ns/a"].ingress.tiered) == 1


def test_a_patch_the_agent_cannot_apply_is_refused_for_a_snapshot() -> None:
    """A patch that removes an allow the agent does not hold, or patches an endpoint it does not
    know, means the two sides diverged: refused (the agent reconnects for a snapshot)."""
    before = big_policy(range(4))
    state = apply_message(None, snapshot_message(1, before))
    stray = delta_message(2, big_policy(range(100, 104)), big_policy(range(101, 105)))
    assert stray.delta.patch_endpoints
    with pytest.raises(MalformedMessage, match="does not hold"):
        apply_message(state, stray)
    unknown = delta_message(2, before, big_policy(range(1, 5)))
    unknown.delta.patch_endpoints[0].name = "elsewhere"
    with pytest.raises(MalformedMessage, match="does not hold"):
        apply_message(state, unknown)
    open_direction = delta_message(2, before, big_policy(range(1, 5)))
    open_direction.delta.patch_endpoints[0].egress.add.extend(open_direction.delta.patch_endpoints[0].ingress.add)
    with pytest.raises(MalformedMessage, match="not isolated"):
        apply_message(state, open_direction)
