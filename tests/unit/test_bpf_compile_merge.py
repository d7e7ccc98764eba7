"""The cheapest policy entries (issue 21 item 9): port ranges of one policy and class are merged
before prefix splitting, and an every-protocol allow of a class absorbs its port ranges.
(That the merged entries answer like the allow lists is checked on random states by
test_bpf_compile.py::test_compiled_maps_answer_like_the_allow_lists_on_random_states.)"""

from __future__ import annotations

import ipaddress

from agent.dataplane.bpf.compiler import compile_node_state, merge_port_ranges, port_range_prefixes
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, NodeState

TCP, UDP = 6, 17


def entries(*allows: Allow) -> int:
    endpoint = Endpoint(
        "t/p", (ipaddress.ip_address("10.0.0.1"),), ingress=DirectionPolicy(True, allows), ifindex=5
    )
    return len(compile_node_state(NodeState(1, {"t/p": endpoint})).policy)


def peer(index: int) -> CidrPeer:
    return CidrPeer(ipaddress.ip_network(f"172.16.{index}.0/24"))


def test_merge_joins_overlapping_and_adjacent_ranges_only() -> None:
    assert merge_port_ranges([(1001, 2000), (1, 1000), (5000, 5000), (1500, 1600)]) == [
        (1, 2000, 3),
        (5000, 5000, 1),
    ]
    assert merge_port_ranges([(10, 20), (22, 30)]) == [(10, 20, 1), (22, 30, 1)]  # 21 is not allowed


def test_adjacent_ranges_cost_one_cover() -> None:
    split = entries(Allow(peer(0), TCP, 1, 1000, "t/a"), Allow(peer(0), TCP, 1001, 2000, "t/b"))
    assert split == len(port_range_prefixes(1, 2000)) == 16
    assert len(port_range_prefixes(1, 1000)) + len(port_range_prefixes(1001, 2000)) == 25  # unmerged


def test_a_hundred_single_ports_are_a_few_prefixes() -> None:
    singles = [Allow(peer(0), TCP, port, port) for port in range(8000, 8100)]
    assert entries(*singles) == len(port_range_prefixes(8000, 8099)) == 3


def test_ranges_under_an_every_protocol_allow_cost_nothing() -> None:
    assert entries(Allow(peer(0)), Allow(peer(0), TCP, 1, 65000), Allow(peer(0), UDP, 53, 53)) == 1


def test_ranges_of_other_protocols_and_classes_stay_apart() -> None:
    assert entries(Allow(peer(0), TCP, 80, 80), Allow(peer(0), UDP, 81, 81)) == 2
    assert entries(Allow(peer(0), TCP, 80, 80), Allow(peer(1), TCP, 81, 81)) == 2
