"""The writer's plan, replayed op by op on a model of the maps: no allow-all or deny-all window.

After every single map operation, every probe (endpoint, direction, peer, protocol, port) that
the old and the new state answer alike must be answered the same way by the half-written maps.
The model's lookups are those of bpf/lib/policy.h (ipcache hash, CIDR longest prefix match,
policy LPM with protocol/port prefixes, policy id 0 = not isolated, no endpoint = dropped).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from agent.dataplane.bpf.compiler import Desired, EndpointEntry, PolicyEntry, compile_node_state
from agent.dataplane.bpf.plan import PUT, Op, plan_update
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


def test_every_intermediate_state_answers_as_old_or_new_when_they_agree() -> None:
    rng = random.Random(7)
    checked_ops = 0
    for round_ in range(40):
        old = compile_node_state(random_state(rng, 1))
        maps = Maps()
        fill(maps, old)
        expected_old = verdicts(maps)
        new_state = random_state(rng, 2)
        new = compile_node_state(new_state, old.allocation)
        reference = Maps()
        fill(reference, compile_node_state(new_state))
        expected_new = verdicts(reference)
        ops = plan_update(maps, new)
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


def test_a_plan_to_the_same_state_is_empty() -> None:
    desired = compile_node_state(random_state(random.Random(3), 1))
    maps = Maps()
    fill(maps, desired)
    again = compile_node_state(random_state(random.Random(3), 2), desired.allocation)
    assert plan_update(maps, again) == []
