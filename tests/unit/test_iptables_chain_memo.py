"""The iptables compiler with its memo of endpoint chains (chain_memo.py, issue 27): after any
sequence of node states, a compile with the memo equals a compile from scratch, and one endpoint
changed among many compiles that endpoint only.
"""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.iptables.chain_memo import ChainMemo
from agent.dataplane.iptables.compiler import Interface, compile_state
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    TIER_ADMIN,
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    NodeState,
    TieredAllow,
)

IFACES = {10 + i: Interface(10 + i, f"veth-{i}", bridge="cni0" if i == 2 else None) for i in range(4)}
ip = ipaddress.ip_address
net = ipaddress.ip_network

peers = st.one_of(
    st.builds(IdentityPeer, st.integers(1, 4)),
    st.sampled_from([
        CidrPeer(net("10.9.0.0/16")),
        CidrPeer(net("10.9.0.0/16"), (net("10.9.1.0/24"),)),
        CidrPeer(net("0.0.0.0/0"), (net("10.0.0.0/8"),)),
        CidrPeer(net("fd00::/64")),
        CidrPeer(net("172.16.0.5/32")),
    ]),
)  # fmt: skip
allows = st.builds(
    Allow,
    peers,
    st.sampled_from([0, 6, 17]),
    st.sampled_from([80, 443, 1000]),
    st.just(-1),  # replaced below: one port, or a range
    st.sampled_from(["ns/p1", "ns/p2", ""]),
    st.sampled_from(["ingress[0]", "egress[1]"]),
).map(lambda a: dataclasses.replace(a, port_last=a.port_first if a.port_first != 1000 else 2000))
tiered = st.builds(
    TieredAllow, st.just(TIER_ADMIN), st.integers(1, 3), st.sampled_from([ACTION_ACCEPT, ACTION_DENY]), peers
)


@st.composite
def direction_policies(draw: st.DrawFn) -> DirectionPolicy:
    policy = DirectionPolicy(draw(st.booleans()), tuple(draw(st.lists(allows, max_size=10))))
    if draw(st.integers(0, 4)) == 0:
        policy = dataclasses.replace(policy, tiered=tuple(draw(st.lists(tiered, min_size=1, max_size=3))))
    if draw(st.integers(0, 4)) == 0:
        audit = DirectionPolicy(True, tuple(draw(st.lists(allows, max_size=3))))
        policy = dataclasses.replace(policy, audit=audit)
    return policy


@st.composite
def node_states(draw: st.DrawFn) -> NodeState:
    endpoints = {}
    for i in draw(st.sets(st.integers(0, 3), max_size=4)):
        key = f"ns/p{i}"
        ips = (ip(f"10.0.0.{i + 1}"),) + ((ip(f"fd00::{i + 1}"),) if i % 2 else ())
        ingress, egress = draw(direction_policies()), draw(direction_policies())
        endpoints[key] = Endpoint(key, ips, ingress, egress, ifindex=10 + i)
    identities = {
        i: tuple(draw(st.sets(st.sampled_from([ip("10.1.0.1"), ip("10.1.0.2"), ip("fd01::1")]), max_size=2)))
        for i in draw(st.sets(st.integers(1, 4)))
    }
    node_ips = draw(st.sampled_from([(ip("192.168.0.1"),), (ip("192.168.0.2"), ip("fd02::1"))]))
    return NodeState(1, endpoints, identities, node_ips, frozenset(IFACES))


compile_settings = st.fixed_dictionaries(
    {
        "flow_group": st.sampled_from([None, 5]),
        "tcp_needs_syn": st.booleans(),
        "flows_per_pod": st.sampled_from([0, 9]),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(node_states(), compile_settings), min_size=1, max_size=5))
def test_a_compile_with_the_memo_equals_one_from_scratch(steps: list[tuple[NodeState, dict]]) -> None:  # type: ignore[type-arg]
    memo = ChainMemo()
    for state, options in steps:
        assert compile_state(state, IFACES, memo=memo, **options) == compile_state(state, IFACES, **options)


def test_an_identity_or_node_address_change_reaches_the_remembered_chains() -> None:
    allow = DirectionPolicy(True, (Allow(IdentityPeer(1), 6, 80, 80, "ns/p1"),))
    endpoints = {"ns/p0": Endpoint("ns/p0", (ip("10.0.0.1"),), ingress=allow, ifindex=10)}
    first = NodeState(1, endpoints, {1: (ip("10.1.0.1"),)}, (ip("192.168.0.1"),), frozenset(IFACES))
    memo = ChainMemo()
    compile_state(first, IFACES, memo=memo)
    for changed in (
        dataclasses.replace(first, identities={1: (ip("10.1.0.2"),)}),
        dataclasses.replace(first, identities={}),
        dataclasses.replace(first, node_ips=(ip("192.168.0.9"),)),
    ):
        assert compile_state(changed, IFACES, memo=memo) == compile_state(changed, IFACES)
        assert memo.compiled >= 1


def host_peer_state(endpoints: int, changed: int | None = None) -> NodeState:
    """`endpoints` pods of 100 single-port host allows each (a policy apiece); `changed`: one
    of that pod's peers replaced."""
    states = {}
    for i in range(endpoints):
        allows = [
            Allow(CidrPeer(ipaddress.IPv4Network((0xAC100000 + 100 * i + j, 32))), 6, 80, 80, f"ns/s{i}-{j}")
            for j in range(100)
        ]
        if i == changed:
            allows[0] = Allow(CidrPeer(net("10.200.0.1/32")), 6, 80, 80, "ns/other")
        key = f"ns/p{i}"
        policy = DirectionPolicy(True, tuple(allows))
        states[key] = Endpoint(key, (ip(f"10.0.{i // 250}.{i % 250 + 1}"),), ingress=policy, ifindex=10 + i)
    return NodeState(1, states)


def test_one_endpoint_changed_among_many_compiles_that_one_only() -> None:
    interfaces = {10 + i: Interface(10 + i, f"veth-{i}") for i in range(40)}
    before, after = host_peer_state(40), host_peer_state(40, changed=7)
    # the unchanged endpoints are the same objects in both states, as the agent's decode keeps them
    after = dataclasses.replace(after, endpoints={**before.endpoints, "ns/p7": after.endpoints["ns/p7"]})
    memo = ChainMemo()
    compile_state(before, interfaces, flow_group=5, memo=memo)
    assert memo.compiled == 2 * 40 * 2  # every direction of every endpoint, both families
    gc.disable()
    try:
        started = time.process_time()
        compile_state(before, interfaces, flow_group=5)
        whole = time.process_time() - started
        started = time.process_time()
        patched = compile_state(after, interfaces, flow_group=5, memo=memo)
        one = time.process_time() - started
    finally:
        gc.enable()
    assert memo.compiled == 4  # ns/p7 only: both directions, both families
    assert patched == compile_state(after, interfaces, flow_group=5)
    assert one < 0.5 * whole, f"one endpoint changed among 40 took {one / whole:.2f}x a whole compile"
