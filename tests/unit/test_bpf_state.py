"""The BPF dataplane's id bookkeeping survives a restart: the state file round-trips exactly."""

from __future__ import annotations

import ipaddress
import json

from agent.dataplane.bpf.compiler import compile_node_state
from agent.dataplane.bpf.state_file import allocation_from_json, allocation_to_json, merge_allocations
from agent.dataplane.types import Allow, CidrPeer, DirectionPolicy, Endpoint, IdentityPeer, NodeState


def sample_state() -> NodeState:
    net, addr = ipaddress.ip_network, ipaddress.ip_address
    allows = (
        Allow(IdentityPeer(1), 6, 80, 90),
        Allow(CidrPeer(net("10.0.0.0/8"), (net("10.1.0.0/16"),))),
        Allow(CidrPeer(net("fd00::/64")), 132, 5000, 5000),
    )
    pod = Endpoint("ns/a", (addr("10.2.0.1"), addr("fd00:2::1")), DirectionPolicy(True, allows), ifindex=4)
    return NodeState(1, {pod.key: pod}, {1: (addr("10.3.0.1"), addr("fd00:3::1"))})


def test_allocation_round_trips_through_json() -> None:
    allocation = compile_node_state(sample_state()).allocation
    restored = allocation_from_json(json.loads(json.dumps(allocation_to_json(allocation))))
    assert restored == allocation
    # and a restarted compiler given it reproduces the same ids (no churn after a restart)
    assert compile_node_state(sample_state(), restored) == compile_node_state(sample_state(), allocation)


def test_unreadable_state_is_ignored_not_fatal() -> None:
    assert allocation_from_json({"policies": "garbage"}) is None


def test_merged_allocation_keeps_every_live_id_and_the_highest_counter() -> None:
    first = compile_node_state(sample_state()).allocation
    changed = NodeState(2, {"ns/a": Endpoint("ns/a", (), DirectionPolicy(True, ()), ifindex=4)})
    second = compile_node_state(changed, first, inherit=False).allocation
    merged = merge_allocations(first, second)
    assert set(merged.policies.values()) == set(first.policies.values()) | set(second.policies.values())
    assert merged.next_id == second.next_id > first.next_id
