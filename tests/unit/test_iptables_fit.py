"""Which policies the iptables dataplane rejects when an ipset would exceed maxelem (issue 21
item 9): every policy matching on the set (no subset frees it), nothing else; isolation kept.
Pure (the real compiler); the same on real traffic is tests/privileged/test_iptables_capacity_fit.py."""

from __future__ import annotations

import ipaddress

import pytest

from agent.dataplane.base import CapacityError
from agent.dataplane.fit import Rejection
from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.fitting import fit_sets
from agent.dataplane.iptables.layout import DesiredState, Interface
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState

TCP = 6


def block(policy: str, excepts: int = 10) -> Allow:
    carved = tuple(ipaddress.ip_network(f"10.1.0.{100 + i}/32") for i in range(excepts))
    return Allow(CidrPeer(ipaddress.ip_network("10.1.0.0/24"), carved), TCP, 8080, 8080, policy)


def state(*endpoints: tuple[str, tuple[Allow, ...]]) -> NodeState:
    eps = {}
    for i, (key, allows) in enumerate(endpoints):
        address = ipaddress.ip_address(f"10.2.0.{i + 1}")
        eps[key] = Endpoint(key, (address,), ingress=DirectionPolicy(True, allows), ifindex=100 + i)
    return NodeState(1, eps, identities={7: (ipaddress.ip_address("10.9.0.1"),)})


def compile_with(maxelem: int, node: NodeState) -> tuple[DesiredState, dict[str, Rejection]]:
    indexes = [e.ifindex for e in node.endpoints.values() if e.ifindex is not None]
    interfaces = {index: Interface(index, f"veth{index}") for index in indexes}
    return fit_sets(node, lambda fitted: compile_state(fitted, interfaces, set_limit=maxelem), maxelem)


def test_every_policy_on_the_overflowing_set_is_rejected_and_only_those() -> None:
    web = Allow(IdentityPeer(7), TCP, 80, 80, "b/web")
    node = state(("a/p", (block("a/huge"), web)), ("c/p", (block("c/same"),)), ("b/p", (web,)))
    desired, rejected = compile_with(8, node)
    assert sorted(rejected) == ["a/huge", "c/same"]  # both match on the one 11-member set
    assert {r.cost for r in rejected.values()} == {11}
    assert all(len(spec.members) <= 8 for spec in desired.sets.values())
    assert any(spec.name.startswith("pf-i4-") for spec in desired.sets.values())  # b/web's identity set
    chains = [chain for family in desired.chains.values() for chain in family.values()]
    rules = "\n".join(rule for chain in chains for rule in chain)
    assert "10.1.0.0/24" not in rules and "pf-n4-" not in rules


def test_fitting_sets_reject_nothing_and_unnamed_overflows_still_raise() -> None:
    assert compile_with(16, state(("a/p", (block("a/huge"),))))[1] == {}
    with pytest.raises(CapacityError, match="maxelem is 8"):
        compile_with(8, state(("a/p", (block(""),))))
