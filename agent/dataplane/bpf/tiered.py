"""ClusterNetworkPolicy verdicts in the policy maps: overlapping rules resolved at compile time.

A tiered policy (a DirectionPolicy with `tiered` entries) holds, for every cell (peer class, peer
kind, protocol, port) its rules cover, one verdict word (structs.verdict_word): the first Admin
hit (lowest rank) and the first other hit (a NetworkPolicy allow at rank 0, or a Baseline rule).
The maps answer one cell per lookup and a longer prefix shadows a shorter one, so the cells must
not overlap in a way the lookup would misread: per protocol, the port space is cut at every rule
boundary and each piece gets the combination of every rule covering it, the protocol-0 rules
("every protocol") included; the protocol-0 entry itself holds only the protocol-0 rules and
answers the ports no protocol-specific piece covers. The datapath then combines the identity
class's word with the CIDR class's word by rank (bpf/lib/policy.h), so a new flow costs the same
few lookups whatever the number of policies and rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import pairwise

from agent.dataplane.bpf.structs import (
    ACT_ACCEPT,
    ACT_PASS,
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    verdict_word,
)
from agent.dataplane.types import PROTO_ANY, TIER_ADMIN, TIER_BASELINE, CidrPeer, IdentityPeer, TieredAllow

# (protocol, port_first, port_last, peer, tier, rank, action): a tiered rule of a policy content
# (a 4-tuple rule is a NetworkPolicy allow: tier "rest", rank 0, Accept)
TieredRule = tuple[int, int, int, CidrPeer | IdentityPeer, int, int, int]
# (tier, rank, action) of one rule; tier 0: a NetworkPolicy allow
Hit = tuple[int, int, int]
PolicyEntry = tuple[int, int, int, int, int, int]

_NETWORK_POLICY_ALLOW: Hit = (0, 0, ACT_ACCEPT)
_RULE_COUNT_MASK = 0xFFFF_FFFF


def tiered_rule(entry: TieredAllow) -> TieredRule:
    action = entry.action
    if entry.tier == TIER_BASELINE and action == ACT_PASS:
        action = ACT_ACCEPT  # after Baseline only the default allow follows
    if entry.protocol == PROTO_ANY:
        return (PROTO_ANY, 0, 65535, entry.peer, entry.tier, entry.rank, action)
    return (entry.protocol, entry.port_first, entry.port_last, entry.peer, entry.tier, entry.rank, action)


def is_tiered(content: Iterable[tuple[object, ...]]) -> bool:
    return any(len(rule) == 7 for rule in content)


def leaf_value(rule_count: int, verdict: int) -> int:
    """One int per policy entry in Desired.policy: the rule count, the verdict above it."""
    return rule_count | verdict << 32


def split_leaf_value(value: int) -> tuple[int, int]:
    return value & _RULE_COUNT_MASK, value >> 32


def _word(hits: Iterable[Hit]) -> int:
    admin = rest = None
    for tier, rank, action in hits:
        if tier == TIER_ADMIN:
            if admin is None or rank < admin[0]:
                admin = (rank, action)
        elif rest is None or rank < rest[0]:
            rest = (rank, action)
    return verdict_word(admin, rest)


def _pieces(ranges: list[tuple[int, int, Hit]]) -> Iterator[tuple[int, int, list[Hit]]]:
    """The port space [0, 65535] cut at every range boundary: each piece any range covers, with
    the hits covering it; adjacent pieces of equal hits are merged."""
    cuts = sorted({first for first, _, _ in ranges} | {last + 1 for _, last, _ in ranges})
    previous: tuple[int, int, list[Hit]] | None = None
    for start, end in pairwise(cuts):
        hits = sorted({hit for first, last, hit in ranges if first <= start and end - 1 <= last})
        if not hits:
            continue
        if previous is not None and previous[1] == start - 1 and previous[2] == hits:
            previous = (previous[0], end - 1, hits)
            continue
        if previous is not None:
            yield previous
        previous = (start, end - 1, hits)
    if previous is not None:
        yield previous


def cell_entries(
    policy_id: int,
    class_id: int,
    kind: int,
    rules: Iterable[tuple[object, ...]],
    port_prefixes: Callable[[int, int], tuple[tuple[int, int], ...]],
) -> Iterator[tuple[PolicyEntry, int]]:
    """The policy entries of one (policy, class, kind) and their leaf values (leaf_value)."""
    any_protocol: list[Hit] = []
    by_protocol: dict[int, list[tuple[int, int, Hit]]] = {}
    for rule in rules:
        protocol, first, last = rule[0], rule[1], rule[2]
        hit: Hit = _NETWORK_POLICY_ALLOW if len(rule) == 4 else (rule[4], rule[5], rule[6])  # type: ignore[assignment]
        if protocol == PROTO_ANY:
            any_protocol.append(hit)
        else:
            by_protocol.setdefault(protocol, []).append((first, last, hit))  # type: ignore[arg-type]
    if any_protocol:
        yield (
            (POLICY_PREFIX_ANY_PROTOCOL, policy_id, class_id, kind, 0, 0),
            leaf_value(len(any_protocol), _word(any_protocol)),
        )
    for protocol, ranges in sorted(by_protocol.items()):
        for first, last, hits in _pieces(ranges):
            value = leaf_value(len(hits), _word([*hits, *any_protocol]))
            for port, bits in port_prefixes(first, last):
                yield (POLICY_PREFIX_PROTOCOL + bits, policy_id, class_id, kind, protocol, port), value
