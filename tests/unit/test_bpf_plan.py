"""The writer's plan, replayed op by op on a model of the maps: no allow-all or deny-all window.

After every single map operation, every probe (endpoint, direction, peer, protocol, port) that
the old and the new state answer alike must be answered the same way by the half-written maps.
The model's lookups are those of bpf/lib/policy.h (ipcache hash, CIDR longest prefix match,
policy LPM with protocol/port prefixes, policy id 0 = not isolated, no endpoint = dropped).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from dataclasses import dataclass, field

import pytest

from agent.dataplane.bpf.compiler import Desired, EndpointEntry, PolicyEntry, compile_node_state
from agent.dataplane.bpf.plan import PUT, Op, compile_and_plan, peak_sizes, plan, plan_update
from agent.dataplane.bpf.structs import (
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    PeerKind,
    addr_bytes,
)
from agent.dataplane.types import (
    Allow,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
)

net, addr = ipaddress.ip_network, ipaddress.ip_address
POOL = [addr(f"10.{a}.{b}.{c}") for a in (0, 1) for b in (0, 5) for c in (1, 9)] + [
    addr(f"fd00:{a}::{c}") for a in (0, 1) for c in (1, 9)
]
PREFIXES = [
    net("10.0.0.0/8"),
    net("10.1.0.0/16"),
    net("10.1.5.0/24"),
    net("10.0.0.9/32"),
    net("fd00::/16"),
    net("fd00:1::/32"),
    net("0.0.0.0/0"),
]
IFINDEXES = (11, 12, 13)


@dataclass
class Maps:
    endpoints: dict[int, EndpointEntry] = field(default_factory=dict)
    endpoint_ips: dict[bytes, int] = field(default_factory=dict)
    node_ips: set[bytes] = field(default_factory=set)
    ipcache: dict[tuple[int, bytes], int] = field(default_factory=dict)
    cidr: dict[tuple[int, int, bytes], int] = field(default_factory=dict)
    policy: set[PolicyEntry] = field(default_factory=set)
    interfaces: set[int] = field(default_factory=set)
    audit: dict[int, tuple[int, int]] = field(default_factory=dict)

    def execute(self, op: Op) -> None:
        put = op.action == PUT
        if op.table in ("counters",):
            return
        target = getattr(self, op.table if op.table != "tc" else "interfaces")
        if isinstance(target, set):
            (target.add if put else target.discard)(op.key)
        elif put:
            target[op.key] = op.value
        else:
            target.pop(op.key, None)


def datapath_allows(
    maps: Maps, ifindex: int, ingress: bool, peer: IPAddress, protocol: int, port: int
) -> bool:
    endpoint = maps.endpoints.get(ifindex)
    if endpoint is None:
        return False  # guarded interface without endpoint: dropped
    policy_id = endpoint.ingress_policy_id if ingress else endpoint.egress_policy_id
    if policy_id == 0:
        return True
    raw = addr_bytes(peer)
    value = int.from_bytes(raw, "big")
    generation = endpoint.generation  # the endpoint names the peer generation it reads
    matches = [
        (plen, cls)
        for (gen, plen, prefix), cls in maps.cidr.items()
        if gen == generation and value >> (128 - plen) == int.from_bytes(prefix, "big") >> (128 - plen)
    ]
    cidr_class = max(matches)[1] if matches else 0
    identity_class = maps.ipcache.get((generation, raw), 0)
    for kind, class_id in ((PeerKind.IDENTITY, identity_class), (PeerKind.CIDR, cidr_class)):
        if not class_id:
            continue
        for plen, pid, cls, entry_kind, entry_protocol, entry_port in maps.policy:
            if (pid, cls, entry_kind) != (policy_id, class_id, kind):
                continue
            if plen == POLICY_PREFIX_ANY_PROTOCOL:
                return True
            bits = plen - POLICY_PREFIX_PROTOCOL
            if entry_protocol == protocol and port >> (16 - bits) == entry_port >> (16 - bits):
                return True
    return False


def random_direction(rng: random.Random) -> DirectionPolicy:
    if rng.random() < 0.25:
        return DirectionPolicy()
    allows = []
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.5:
            peer: IdentityPeer | CidrPeer = IdentityPeer(rng.randint(1, 4))
        else:
            cidr = rng.choice(PREFIXES)
            excepts = tuple(
                p
                for p in PREFIXES
                if p != cidr and p.version == cidr.version and p.subnet_of(cidr) and rng.random() < 0.5  # type: ignore[arg-type]
            )
            peer = CidrPeer(cidr, excepts)
        protocol = rng.choice([0, 6, 17])
        first = rng.randint(0, 60)
        allows.append(Allow(peer, protocol, first, rng.randint(first, 80)) if protocol else Allow(peer))
    return DirectionPolicy(True, tuple(allows))


def random_state(rng: random.Random, version: int) -> NodeState:
    endpoints = {}
    for index, ifindex in enumerate(IFINDEXES):
        if rng.random() < 0.8:
            key = f"ns/pod{index}"
            endpoints[key] = Endpoint(
                key, (addr(f"10.9.0.{index + 1}"),), random_direction(rng), random_direction(rng), ifindex
            )
    identities = {i: tuple(rng.sample(POOL, rng.randint(0, 4))) for i in range(1, 5)}
    return NodeState(version, endpoints, identities, (), frozenset(IFINDEXES))


def small_edit(rng: random.Random, state: NodeState, version: int) -> NodeState:
    """`state` with one thing changed, as a real update usually is: an allow added to or removed
    from one direction (its readers move together: the id is kept), or one address moved
    between identities, or both."""
    endpoints = dict(state.endpoints)
    identities = dict(state.identities)
    if endpoints and rng.random() < 0.8:
        key = rng.choice(sorted(endpoints))
        endpoint = endpoints[key]
        direction = endpoint.ingress if rng.random() < 0.5 else endpoint.egress
        allows = list(direction.allows)
        if allows and rng.random() < 0.5:
            allows.pop(rng.randrange(len(allows)))
        else:
            allows += random_direction(rng).allows[:1] or [Allow(IdentityPeer(rng.randint(1, 4)))]
        changed = DirectionPolicy(True, tuple(allows))
        if direction is endpoint.ingress:
            endpoints[key] = dataclasses.replace(endpoint, ingress=changed)
        else:
            endpoints[key] = dataclasses.replace(endpoint, egress=changed)
    if rng.random() < 0.5:
        moved = rng.choice(POOL)
        identities = {i: tuple(a for a in ips if a != moved) for i, ips in identities.items()}
        target = rng.randint(1, 4)
        identities[target] = (*identities[target], moved)
    return NodeState(version, endpoints, identities, (), frozenset(IFINDEXES))


def fill(maps: Maps, desired: Desired) -> None:
    for op in plan_update(maps, desired):
        maps.execute(op)


PROBES = [
    (ifindex, ingress, peer, protocol, port)
    for ifindex in IFINDEXES
    for ingress in (True, False)
    for peer in POOL
    for protocol, port in ((6, 10), (6, 70), (17, 10), (17, 79), (1, 0))
]


def verdicts(maps: Maps) -> list[bool]:
    return [datapath_allows(maps, *probe) for probe in PROBES]


@pytest.mark.parametrize(
    ("in_place", "edits"),
    [(False, False), (True, False), (True, True)],
    ids=["double-buffer", "in-place", "in-place-small-edits"],
)
def test_every_intermediate_state_answers_as_old_or_new_when_they_agree(in_place: bool, edits: bool) -> None:
    # seed 6 finds both orders a first version of the in-place plan got wrong (an interim copy
    # without entries on the new classes; a list changed in place while an address joined a class)
    rng = random.Random(6 if in_place else 7)
    checked_ops = in_place_rounds = 0
    for round_ in range(40):
        old_state = random_state(rng, 1)
        old = compile_node_state(old_state)
        maps = Maps()
        fill(maps, old)
        expected_old = verdicts(maps)
        new_state = small_edit(rng, old_state, 2) if edits else random_state(rng, 2)
        reference = Maps()
        fill(reference, compile_node_state(new_state))
        expected_new = verdicts(reference)
        if in_place:  # in place where it can, else the double buffer (identities that moved)
            new, ops, union = compile_and_plan(maps, new_state, old.allocation)
            in_place_rounds += union is not None
        else:  # the double buffer needs ids whose content never changes
            new = compile_node_state(new_state, old.allocation, inherit=False)
            ops, union = plan(maps, new, None)
        if union is not None:  # never both views whole: at most the union of old and new prefixes
            peaks = peak_sizes(maps, ops)
            peak_cidr = peaks["cidr"] + peaks["cidr_host"]
            assert peak_cidr <= len(set(old.cidr) | set(new.cidr)), round_
        for op in ops:
            maps.execute(op)
            for probe, now, before, after in zip(
                PROBES, verdicts(maps), expected_old, expected_new, strict=True
            ):
                if before == after:
                    assert now == before, f"round {round_}: after {op}, {probe} answered {now}"
            checked_ops += 1
        assert verdicts(maps) == expected_new  # and the plan ends exactly in the new state
        generations = {e.generation for e in maps.endpoints.values()}
        assert len(generations) <= 1  # one peer generation left, exactly the new peer view
        assert maps.policy == set(new.policy)
        assert {a: c for (_, a), c in maps.ipcache.items()} == new.ipcache
        assert {(p, a): c for (_, p, a), c in maps.cidr.items()} == new.cidr
    assert checked_ops > 200
    if edits:
        assert in_place_rounds >= 10, in_place_rounds  # the path under test was taken


def test_a_plan_to_the_same_state_is_empty() -> None:
    desired = compile_node_state(random_state(random.Random(3), 1))
    maps = Maps()
    fill(maps, desired)
    again = compile_node_state(random_state(random.Random(3), 2), desired.allocation)
    assert plan_update(maps, again) == []


def host_peer_state(peers: list[str]) -> NodeState:
    allows = tuple(Allow(CidrPeer(ipaddress.ip_network(p)), 6, 8080, 8080) for p in peers)
    endpoint = Endpoint("ns/p0", (addr("10.9.0.1"),), DirectionPolicy(True, allows), DirectionPolicy(), 11)
    return NodeState(1, {"ns/p0": endpoint}, {}, (), frozenset({11}))


def test_one_peer_changed_among_many_is_a_few_in_place_writes_within_the_maps() -> None:
    """Issue 27: one peer of a 2,000-peer list replaced needed every CIDR entry twice (a policy
    that fits once could never be edited again); in place it is a handful of operations."""
    peers = [f"172.16.{i // 256}.{i % 256}/32" for i in range(2000)]
    old = compile_node_state(host_peer_state(peers))
    maps = Maps()
    fill(maps, old)
    edited = [*peers[:-1], "172.31.0.1/32"]
    new, ops, union = compile_and_plan(maps, host_peer_state(edited), old.allocation)
    assert union is not None
    peaks = peak_sizes(maps, ops)
    assert peaks["cidr_host"] <= len(peers) + 1 and peaks["cidr"] == 0  # host prefixes: the hash
    # the allow list keeps its id: a peer entry and a policy entry in, the same out
    assert new.endpoints[11].ingress_policy_id == old.endpoints[11].ingress_policy_id
    assert sorted((op.table, op.action) for op in ops) == [
        ("cidr", "delete"), ("cidr", "put"), ("policy", "delete"), ("policy", "put")
    ]  # fmt: skip
    for op in ops:
        maps.execute(op)
    reference = Maps()
    fill(reference, compile_node_state(host_peer_state(edited)))
    assert {(p, a): c for (_, p, a), c in maps.cidr.items()}.keys() == {
        (p, a) for (_, p, a) in reference.cidr
    }
    assert datapath_allows(maps, 11, True, addr("172.31.0.1"), 6, 8080)
    assert not datapath_allows(maps, 11, True, addr("172.16.7.207"), 6, 8080)  # the replaced one
    assert datapath_allows(maps, 11, True, addr("172.16.0.1"), 6, 8080)
