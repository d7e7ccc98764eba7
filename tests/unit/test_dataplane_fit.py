"""Which policy is rejected when a node's state does not fit its maps (issue 21 item 9).

The choice must be deterministic (largest in the overflowing map first, then by name), must
reject as little as it can, and must fail closed: a rejected policy loses its allows, never
the isolation of the pods it selects.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from agent.dataplane.base import CapacityError
from agent.dataplane.bpf.compiler import NOT_ISOLATED
from agent.dataplane.bpf.fitting import fit_and_plan, policy_costs
from agent.dataplane.fit import Overflow, choose_rejections, strip_policies
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState
from tests.unit.test_bpf_plan import Maps  # the model of the maps; empty: a node's first apply

TCP = 6
BIG = 1 << 20


def rooms(**sizes: int) -> dict[str, int]:
    names = ("policy", "policy_exact", "ipcache", "cidr", "cidr_host", "endpoints", "endpoint_ips")
    every = {f"pf_{name}": BIG for name in (*names, "node_ips", "counters")}
    every.update({f"pf_{name}": size for name, size in sizes.items()})
    return every


def cidr_allows(
    policy: str, count: int, first: int = 1, last: int = 65000, start: int = 0
) -> tuple[Allow, ...]:
    """`count` distinct CIDR classes x the port range; 1-65000 is 26 prefixes: 24 LPM, 2 exact."""
    return tuple(
        Allow(CidrPeer(ipaddress.ip_network(f"172.{16 + i // 256}.{i % 256}.0/24")), TCP, first, last, policy)
        for i in range(start, start + count)
    )


def web(policy: str, *ports: int) -> tuple[Allow, ...]:
    return tuple(Allow(IdentityPeer(7), TCP, port, port, policy) for port in ports)


def node(*endpoints: tuple[str, tuple[Allow, ...]]) -> NodeState:
    eps = {
        key: Endpoint(
            key,
            (ipaddress.ip_address(f"10.0.0.{i + 1}"),),
            ingress=DirectionPolicy(True, allows),
            ifindex=100 + i,
        )
        for i, (key, allows) in enumerate(endpoints)
    }
    return NodeState(1, eps, identities={7: (ipaddress.ip_address("10.9.0.1"),)})


# -- strip_policies -------------------------------------------------------------------------------


def test_stripping_keeps_isolation_and_the_other_policies_allows() -> None:
    state = node(("a/p", web("a/huge", 80) + web("a/base", 8080)), ("b/p", web("b/web", 443)))
    stripped = strip_policies(state, {"a/huge"})
    a = stripped.endpoints["a/p"]
    assert a.ingress.isolated and [x.policy for x in a.ingress.allows] == ["a/base"]
    assert stripped.endpoints["b/p"] is state.endpoints["b/p"]  # untouched endpoints are shared
    # a pod isolated by the rejected policy alone stays isolated with nothing allowed
    only = strip_policies(node(("a/p", web("a/huge", 80))), {"a/huge"}).endpoints["a/p"]
    assert only.ingress == DirectionPolicy(True, ())
    assert strip_policies(state, set()) is state


def test_stripping_keeps_shared_allow_lists_shared() -> None:
    shared = DirectionPolicy(True, web("a/huge", 80) + web("a/base", 81))
    eps = {k: Endpoint(k, (), ingress=shared, egress=shared) for k in ("a/x", "a/y")}
    stripped = strip_policies(NodeState(1, eps), {"a/huge"})
    x, y = stripped.endpoints["a/x"], stripped.endpoints["a/y"]
    assert x.ingress is y.ingress is x.egress is y.egress


# -- choose_rejections ----------------------------------------------------------------------------


def test_the_largest_policy_goes_first_then_by_name() -> None:
    costs = {"pf_policy": {"a/huge": 500, "b/web": 10, "c/z": 500, "": 900}}
    chosen = choose_rejections([Overflow("pf_policy", 600, 200)], costs, set())
    # 400 over: one of the two 500s suffices, the first by name; the unnamed allows never go
    assert [(r.policy, r.table, r.cost) for r in chosen] == [("a/huge", "pf_policy", 500)]
    chosen = choose_rejections([Overflow("pf_policy", 1200, 200)], costs, set())
    assert [r.policy for r in chosen] == ["a/huge", "c/z"]
    assert choose_rejections([Overflow("pf_policy", 600, 200)], costs, {"a/huge"})[0].policy == "c/z"


def test_one_rejection_counts_for_every_table_it_frees() -> None:
    costs = {"pf_policy": {"a/huge": 50, "b/web": 5}, "pf_cidr": {"a/huge": 30, "b/web": 40}}
    chosen = choose_rejections([Overflow("pf_policy", 60, 20), Overflow("pf_cidr", 70, 50)], costs, set())
    assert [r.policy for r in chosen] == ["a/huge"]  # frees 30 of pf_cidr too: b/web stays


def test_nothing_to_reject_when_no_policy_is_named() -> None:
    assert choose_rejections([Overflow("pf_policy", 60, 20)], {"pf_policy": {"": 60}}, set()) == []
    assert choose_rejections([Overflow("pf_endpoints", 60, 20)], {}, set()) == []


# -- fit_and_plan ---------------------------------------------------------------------------------


def test_a_state_that_fits_rejects_nothing() -> None:
    state = node(("a/p", cidr_allows("a/huge", 8)), ("b/p", web("b/web", 80, 443)))
    _desired, _ops, _union, rejected = fit_and_plan(Maps(), state, None, rooms())
    assert rejected == {}


def test_the_oversized_policy_is_rejected_alone_and_fails_closed() -> None:
    state = node(("a/p", cidr_allows("a/huge", 8) + web("a/base", 8080)), ("b/p", web("b/web", 80, 443)))
    desired, _ops, _union, rejected = fit_and_plan(Maps(), state, None, rooms(policy=64))
    assert list(rejected) == ["a/huge"]
    assert rejected["a/huge"].table == "pf_policy" and rejected["a/huge"].cost == 8 * 24
    assert "a/huge" in rejected["a/huge"].message and "pf_policy" in rejected["a/huge"].message
    by_key = {e.endpoint_key: e for e in desired.endpoints.values()}
    assert by_key["a/p"].ingress_policy_id != NOT_ISOLATED  # still isolated
    ports = {entry[5] for entry in desired.policy}
    assert ports == {8080, 80, 443}  # every kept policy's single ports; none of a/huge's ranges
    assert len(desired.policy) <= 64


def test_the_choice_does_not_depend_on_order() -> None:
    huge = cidr_allows("a/huge", 8)
    other = cidr_allows("z/big", 8, 1000, 1999)  # 8 x 5 entries: fits once a/huge is gone
    forward = node(("a/p", huge), ("z/p", other), ("b/p", web("b/web", 80)))
    backward = node(("b/p", web("b/web", 80)), ("z/p", other[::-1]), ("a/p", huge[::-1]))
    for state in (forward, backward):
        assert list(fit_and_plan(Maps(), state, None, rooms(policy=64))[3]) == ["a/huge"]


def test_equal_offenders_are_rejected_by_name_as_far_as_needed() -> None:
    state = node(("b/p", cidr_allows("b/big", 4)), ("a/p", cidr_allows("a/big", 4, start=100)))
    _d, _o, _u, rejected = fit_and_plan(Maps(), state, None, rooms(policy=4 * 24))
    assert list(rejected) == ["a/big"]
    _d, _o, _u, rejected = fit_and_plan(Maps(), state, None, rooms(policy=10))
    assert sorted(rejected) == ["a/big", "b/big"]


def test_cidr_map_overflow_rejects_the_policy_with_the_most_prefixes() -> None:
    state = node(("a/p", cidr_allows("a/wide", 40, 80, 80)), ("b/p", cidr_allows("b/narrow", 2, 80, 80)))
    _d, _o, _u, rejected = fit_and_plan(Maps(), state, None, rooms(cidr=10))
    assert list(rejected) == ["a/wide"] and rejected["a/wide"].table == "pf_cidr"


def test_overflows_no_policy_can_cure_still_raise() -> None:
    state = node(("a/p", web("a/base", 80)), ("b/p", web("b/web", 80)))
    with pytest.raises(CapacityError, match="pf_endpoints"):
        fit_and_plan(Maps(), state, None, rooms(endpoints=1))
    unnamed = node(("a/p", cidr_allows("", 8)))
    with pytest.raises(CapacityError, match="pf_policy would need 192"):
        fit_and_plan(Maps(), unnamed, None, rooms(policy=64))


def test_costs_count_each_allow_by_its_classes_and_port_prefixes() -> None:
    state = node(("a/p", cidr_allows("a/huge", 3) + web("a/base", 80, 81)))
    desired = fit_and_plan(Maps(), state, None, rooms())[0]
    costs = policy_costs(state, desired)
    assert costs["pf_policy"] == {"a/huge": 3 * 24}
    assert costs["pf_policy_exact"] == {"a/huge": 3 * 2, "a/base": 2}
    assert costs["pf_cidr"] == {"a/huge": 3}
    assert costs["pf_ipcache"] == {"a/base": 1}
    # an endpoint that is not isolated costs nothing
    open_state = dataclasses.replace(
        state, endpoints={"a/p": dataclasses.replace(state.endpoints["a/p"], ingress=DirectionPolicy())}
    )
    assert policy_costs(open_state, desired)["pf_policy"] == {}


def test_a_policy_rejected_for_want_of_transient_room_fits_from_the_state_written() -> None:
    # a/grow moves its ports from TCP to UDP: the update holds its old and its new entries
    udp = tuple(dataclasses.replace(allow, protocol=17) for allow in cidr_allows("a/grow", 2))
    before = node(("a/p", cidr_allows("a/grow", 2)), ("b/p", web("b/web", 80)))
    after = node(("a/p", udp), ("b/p", web("b/web", 80)))
    maps, room = Maps(), rooms(policy=60)  # 48 LPM entries either way, 96 side by side
    desired, ops, _union, rejected = fit_and_plan(maps, before, None, room)
    for op in ops:
        maps.execute(op)
    assert rejected == {}
    desired, ops, _union, rejected = fit_and_plan(maps, after, desired.allocation, room)
    assert list(rejected) == ["a/grow"]
    for op in ops:
        maps.execute(op)
    # BpfDataplane.apply tries once more from what it wrote: now only the new entries count
    _desired, _ops, _union, rejected = fit_and_plan(maps, after, desired.allocation, room)
    assert rejected == {}
