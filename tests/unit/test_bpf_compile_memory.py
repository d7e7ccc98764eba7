"""The compiler's memory of its last CIDR classes (issue 27) never changes an answer: classes
moved by a few host peers equal a fresh sweep, and a compile (and its plan) with the memory warm
equals one with the memory emptied, over random sequences of small edits and unrelated states."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.bpf import cidr_classes
from agent.dataplane.bpf.cidr_classes import cidr_classes_of, lpm_cidr_classes
from agent.dataplane.bpf.compiler import compile_node_state
from agent.dataplane.bpf.plan import compile_and_plan
from agent.dataplane.bpf.structs import network_prefix
from agent.dataplane.bpf.transition import with_union
from agent.dataplane.types import CidrPeer
from tests.unit.test_bpf_plan import Maps, fill, random_state, small_edit

net = ipaddress.ip_network
# Hosts inside and outside the wider prefixes, and on the excepts' edges.
HOSTS = [CidrPeer(net(f"10.1.{i}.{j}/32")) for i in (0, 5) for j in (0, 1, 9)]
HOSTS += [CidrPeer(net("10.0.0.9/32")), CidrPeer(net("fd00:1::1/128")), CidrPeer(net("192.0.2.1/32"))]
WIDE = [
    CidrPeer(net("10.0.0.0/8"), (net("10.1.0.0/16"),)),
    CidrPeer(net("10.1.0.0/16"), (net("10.1.5.0/24"),)),
    CidrPeer(net("10.1.5.0/24")),
    CidrPeer(net("10.1.0.1/32")),  # also a host of HOSTS, with another peer beside it
    CidrPeer(net("::/0")),
    CidrPeer(net("fd00::/16"), (net("fd00:1::1/128"),)),  # a host that is someone's except
]


def swept(peers: set[CidrPeer]) -> dict[tuple[int, bytes], frozenset[CidrPeer]]:
    return {network_prefix(prefix): members for prefix, members in cidr_classes_of(peers).items()}


@settings(max_examples=300, deadline=None)
@given(
    st.sets(st.sampled_from(WIDE)),
    st.lists(st.sets(st.sampled_from(HOSTS)), min_size=1, max_size=6),
    st.lists(st.sets(st.sampled_from(WIDE)), max_size=2),
)
def test_remembered_cidr_classes_equal_a_fresh_sweep(
    wide: set[CidrPeer], host_sets: list[set[CidrPeer]], wide_changes: list[set[CidrPeer]]
) -> None:
    cidr_classes.forget()
    sequence = [wide | hosts for hosts in host_sets] + [changed | host_sets[-1] for changed in wide_changes]
    for peers in sequence:
        assert lpm_cidr_classes(peers) == swept(peers)


def test_a_compile_with_warm_memories_equals_one_from_nothing() -> None:
    rng = random.Random(27)
    maps, previous, state = Maps(), None, random_state(rng, 1)
    for version in range(2, 120):
        state = small_edit(rng, state, version) if rng.random() < 0.8 else random_state(rng, version)
        warm = compile_and_plan(maps, state, previous)
        cidr_classes.forget()
        cold = compile_and_plan(maps, state, previous)
        assert warm == cold, version
        desired, ops, union = warm
        for op in ops:
            maps.execute(op)
        previous = with_union(desired.allocation, union)
    fill(Maps(), compile_node_state(state))
