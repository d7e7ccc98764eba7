"""A tier's precedence resolved at compile time into one hash:net,port set per action.

Within a tier the entry of lowest rank that matches decides. The eBPF compiler resolves that into
verdict words (agent/dataplane/bpf/tiered.py); here it becomes sets that never disagree, so a new
flow costs one set lookup per action (at most three), whatever the number of rules and however
their actions alternate.

Per cell (protocol, port) the entries are prefixes: an identity's members as host routes, a CIDR
as itself, its excepts as holes. hash:net,port answers for the most specific prefix it holds that
contains the address (a `nomatch` entry answers "no"). So every prefix any entry of the cell
names (cidrs, excepts, members) is a node of the cell's prefix tree, and an address whose most
specific node is Q is matched by exactly the entries whose prefix contains Q and none of whose
excepts contains Q: Q's verdict is the action of the first such entry by rank. Each action's set
holds Q when Q's verdict is that action, and Q as `nomatch` when it is not but a wider node of
that set would otherwise answer for it.

Only single-port TCP/UDP/SCTP entries make a cell. A wider entry (a port range, every port or
every protocol, ICMP) also joins the tree of every cell it covers, so the sets answer for the
cells' ports with its precedence; packets of other ports and protocols meet the wider entries
alone, written after the sets as runs of one action (tiers.py). Where the sets answer "no" for a
cell, no wider entry matches the packet either, so reaching the runs never reverses precedence.
A new flow costs the sets plus one lookup per change of action among the wider entries only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.dataplane.types import PROTO_ANY, CidrPeer, IdentityPeer, IPAddress, IPNetwork, TieredAllow

PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}

Prefix = tuple[int, int]  # (network address as an int, prefix length)


@dataclass(frozen=True)
class _Entry:
    rank: int
    action: int
    prefixes: tuple[Prefix, ...]
    holes: tuple[Prefix, ...]
    policy: str


def _ancestors(prefix: Prefix, bits: int) -> list[Prefix]:
    """Every strictly wider prefix containing `prefix`."""
    address, length = prefix
    return [((address >> (bits - n)) << (bits - n) if n else 0, n) for n in range(length)]


def _prefixes(networks: Iterable[IPNetwork]) -> tuple[Prefix, ...]:
    """hash:net,port cannot hold a /0: it is its two halves."""
    found: list[Prefix] = []
    for network in networks:
        halves = network.subnets(1) if network.prefixlen == 0 else (network,)
        found += [(int(n.network_address), n.prefixlen) for n in halves]
    return tuple(found)


def _entry(entry: TieredAllow, family: int, identities: Mapping[int, tuple[IPAddress, ...]]) -> _Entry:
    peer = entry.peer
    if isinstance(peer, IdentityPeer):
        members = identities.get(peer.identity, ())
        networks = [ipaddress.ip_network(ip) for ip in members if ip.version == family]
        return _Entry(entry.rank, entry.action, _prefixes(networks), (), entry.policy)
    assert isinstance(peer, CidrPeer)
    if peer.cidr.version != family:
        return _Entry(entry.rank, entry.action, (), (), entry.policy)
    holes = _prefixes(e for e in peer.excepts if e.version == family)
    return _Entry(entry.rank, entry.action, _prefixes([peer.cidr]), holes, entry.policy)


def _covers(entry: TieredAllow, cell: tuple[str, int]) -> bool:
    protocol, port = cell
    if entry.protocol == PROTO_ANY:
        return True
    return PORT_PROTOCOLS.get(entry.protocol) == protocol and entry.port_first <= port <= entry.port_last


def cell_of(entry: TieredAllow) -> tuple[str, int] | None:
    """The (protocol name, port) cell of a single-port entry; None for any other entry."""
    protocol = PORT_PROTOCOLS.get(entry.protocol)
    if protocol is None or entry.port_first != entry.port_last or entry.port_first <= 0:
        return None
    return protocol, entry.port_first


@dataclass
class ResolvedTier:
    """Set members (hash:net,port spellings) per action, the policies behind each, and the entries
    no cell holds (to be matched after the sets, in rank order)."""

    members: dict[int, set[str]]
    policies: dict[int, set[str]]
    wide: tuple[TieredAllow, ...] = ()


def resolve_tier(
    entries: Iterable[TieredAllow], family: int, identities: Mapping[int, tuple[IPAddress, ...]]
) -> ResolvedTier:
    """The tier's entries as disjoint per-action sets for `family`, and its wider entries."""
    bits = 32 if family == 4 else 128
    ranked = sorted(entries, key=lambda e: e.rank)
    wide = tuple(e for e in ranked if cell_of(e) is None)
    cells: dict[tuple[str, int], list[_Entry]] = {}
    for cell in sorted({c for e in ranked if (c := cell_of(e)) is not None}):
        cells[cell] = [_entry(e, family, identities) for e in ranked if _covers(e, cell)]
    resolved = ResolvedTier({}, {}, wide)
    for (protocol, port), cell_entries in cells.items():
        # prefix -> indexes (rank order) of the entries naming it as a prefix / as a hole
        owners: dict[Prefix, list[int]] = {}
        holes: dict[Prefix, list[int]] = {}
        for index, e in enumerate(cell_entries):
            for prefix in e.prefixes:
                owners.setdefault(prefix, []).append(index)
            for hole in e.holes:
                holes.setdefault(hole, []).append(index)
        nodes = set(owners) | set(holes)
        # node -> its wider nodes; cost per node: one dict probe per prefix length, not per node
        wider = {node: [a for a in _ancestors(node, bits) if a in nodes] for node in nodes}
        verdicts: dict[Prefix, int] = {}  # node -> action; absent: no entry matches there
        for node in nodes:
            around = (node, *wider[node])
            matching = {i for a in around for i in owners.get(a, ())}
            matching -= {i for a in around for i in holes.get(a, ())}
            if matching:
                first = cell_entries[min(matching)]
                verdicts[node] = first.action
                resolved.policies.setdefault(first.action, set()).add(first.policy)
        for node in nodes:
            address = ipaddress.ip_address(node[0]) if family == 4 else ipaddress.IPv6Address(node[0])
            member = f"{address}/{node[1]},{protocol}:{port}"
            action = verdicts.get(node)
            if action is not None:
                resolved.members.setdefault(action, set()).add(member)
            # the sets of other actions must not answer for this node through a wider one
            for other in {verdicts.get(a) for a in wider[node]} - {None, action}:
                assert other is not None
                resolved.members.setdefault(other, set()).add(f"{member} nomatch")
    return resolved
