"""A tier's precedence resolved into one hash:net,port set per action (tier_sets.py), without root.

The sets are read as the kernel reads hash:net,port: the most specific prefix held for the
address and cell decides, a `nomatch` one answering no. For random tiers (prefixes, identities,
excepts, alternating actions, shared ports) every address and port of a small space must be matched by
at most one set, that of the first entry by rank that matches it; where no set answers, the
wider entries (port ranges, every protocol), matched after the sets in rank order, must give the
same verdict as the first entry by rank, or none if no entry matches.
The chain then holds one rule per action whatever the number of entries (the flat cost).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.iptables.compiler import compile_state
from agent.dataplane.iptables.layout import Interface
from agent.dataplane.iptables.tier_sets import resolve_tier
from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    CidrPeer,
    DirectionPolicy,
    Endpoint,
    IdentityPeer,
    IPAddress,
    NodeState,
    TieredAllow,
)

SPACE = ipaddress.IPv4Network("10.0.0.0/28")
PORTS = (80, 81)  # the single-port entries' cells
PROBED_PORTS = (79, 80, 81, 82)
SHAPES = ((6, 80, 80), (6, 81, 81), (6, 80, 82), (6, 79, 80), (0, 0, 65535), (17, 80, 80))
IDENTITIES = {1: (ipaddress.ip_address("10.0.0.3"), ipaddress.ip_address("10.0.0.9")),
              2: (ipaddress.ip_address("10.0.0.4"),)}  # fmt: skip


def _prefix(draw: st.DrawFn) -> ipaddress.IPv4Network:
    length = draw(st.integers(24, 32))
    address = draw(st.integers(0, 15))
    return ipaddress.IPv4Network((int(SPACE.network_address) + address, length), strict=False)


@st.composite
def entries(draw: st.DrawFn) -> list[TieredAllow]:
    found = []
    for rank in range(1, draw(st.integers(1, 8)) + 1):
        action = draw(st.sampled_from((ACTION_ACCEPT, ACTION_DENY, ACTION_PASS)))
        protocol, first, last = draw(st.sampled_from(SHAPES))
        if draw(st.booleans()):
            peer: CidrPeer | IdentityPeer = IdentityPeer(draw(st.sampled_from((1, 2, 3))))
        else:
            cidr = _prefix(draw) if draw(st.integers(0, 5)) else ipaddress.IPv4Network("0.0.0.0/0")
            excepts = tuple(_prefix(draw) for _ in range(draw(st.integers(0, 2))))
            peer = CidrPeer(cidr, excepts)
        found.append(TieredAllow(TIER_ADMIN, rank, action, peer, protocol, first, last, f"p{rank}"))
    return found


def _matches(entry: TieredAllow, address: ipaddress.IPv4Address, port: int) -> bool:
    """The probes are TCP."""
    if entry.protocol not in (0, 6) or not entry.port_first <= port <= entry.port_last:
        return False
    peer = entry.peer
    if isinstance(peer, IdentityPeer):
        return address in IDENTITIES.get(peer.identity, ())
    return address in peer.cidr and not any(address in e for e in peer.excepts)


def _kernel_lookup(members: set[str], address: ipaddress.IPv4Address, port: int) -> bool:
    best: tuple[int, bool] | None = None
    for member in members:
        text, _, flag = member.partition(" ")
        net, _, cell = text.partition(",")
        if cell != f"tcp:{port}" or address not in ipaddress.ip_network(net):
            continue
        length = ipaddress.ip_network(net).prefixlen
        if best is None or length > best[0]:
            best = (length, flag != "nomatch")
    return best is not None and best[1]


@settings(max_examples=300, deadline=None)
@given(entries())
def test_the_sets_answer_as_the_first_entry_by_rank(tier: list[TieredAllow]) -> None:
    resolved = resolve_tier(tier, 4, IDENTITIES)
    assert all(e.port_first != e.port_last or e.protocol not in (6, 17) for e in resolved.wide)
    by_rank = sorted(tier, key=lambda e: e.rank)
    for address in [*SPACE, ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("200.0.0.1")]:
        for port in PROBED_PORTS:
            expected = next((e.action for e in by_rank if _matches(e, address, port)), None)
            answered = [a for a, held in resolved.members.items() if _kernel_lookup(held, address, port)]
            assert len(answered) <= 1, (address, port, answered)
            if not answered:
                answered = [e.action for e in resolved.wide if _matches(e, address, port)][:1]
            assert answered == ([expected] if expected is not None else []), (address, port)


def test_a_port_range_is_matched_after_the_sets_and_folded_into_the_cells_it_covers() -> None:
    wide = TieredAllow(TIER_ADMIN, 1, ACTION_DENY, CidrPeer(SPACE), 6, 80, 90)
    single = TieredAllow(TIER_ADMIN, 2, ACTION_ACCEPT, CidrPeer(SPACE), 6, 85, 85)
    resolved = resolve_tier([wide, single], 4, {})
    assert resolved.wide == (wide,)
    assert resolved.members == {ACTION_DENY: {"10.0.0.0/28,tcp:85"}}  # the range outranks the Accept


def _rules(admin: int) -> list[str]:
    tiered = tuple(
        TieredAllow(TIER_ADMIN, i + 1, (ACTION_PASS, ACTION_ACCEPT, ACTION_DENY)[i % 3],
                    IdentityPeer(100 + i), 6, 20000 + i, 20000 + i)
        for i in range(admin)
    )  # fmt: skip
    identities: dict[int, tuple[IPAddress, ...]] = {
        100 + i: (ipaddress.IPv4Address("10.65.0.0") + i,) for i in range(admin)
    }
    ingress = DirectionPolicy(False, (), tiered)
    pod = Endpoint("bench/pod", (ipaddress.ip_address("10.0.0.1"),), ingress, ifindex=1)
    state = NodeState(1, {pod.key: pod}, identities, (), frozenset({1}))
    desired = compile_state(state, {1: Interface(1, "pfv-bench")})
    return [rule for chains in desired.chains.values() for rules in chains.values() for rule in rules]


def test_alternating_actions_cost_one_rule_per_action_whatever_their_number() -> None:
    few, many = _rules(10), _rules(1000)
    assert len(few) == len(many)
    assert sum("--match-set pf-t4ia" in rule for rule in many) == 3  # accept, deny, pass
