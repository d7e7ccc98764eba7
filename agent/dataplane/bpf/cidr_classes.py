"""CIDR classes: for every cidr/except prefix of the referenced ipBlock peers, the set of peers
containing the addresses whose longest match it is (the datapath's pf_cidr value is that set's
class id). Pure (no I/O).

`cidr_classes_of` computes them from scratch by one sweep. `lpm_cidr_classes` gives the same
classes keyed by LPM prefix, and keeps its last few answers: an update that adds or removes a
few host peers (/32, /128 without excepts: an allow list edited by a peer) changes only those
peers' own prefixes, so the next answer is the last one with those prefixes recomputed, not a
sweep over 10,000 peers (issue 27: the sweep and the prefix conversion were ~0.4 s of the
agent's work for one peer changed).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from agent.dataplane.bpf.structs import network_prefix
from agent.dataplane.types import V4_MAPPED_SPACE, CidrPeer, IPNetwork

CidrPrefix = tuple[int, bytes]  # (prefixlen in the 128-bit space, 16 address bytes)

# An incremental answer costs one supernet walk per changed peer; past this many changes the
# sweep is as cheap.
MAX_INCREMENTAL_CHANGES = 256
_REMEMBERED = 3  # the compile's answer, the union view's, and the one before


def cidr_classes_of(peers: Iterable[CidrPeer]) -> dict[IPNetwork, frozenset[CidrPeer]]:
    """For every cidr/except prefix: the peers containing the addresses whose longest match it is.

    An address whose longest match is P lies inside a peer's cidr iff P is a subnet of that cidr
    (every cidr is itself a prefix of the set), and likewise for excepts, so the answer is uniform
    over P's addresses. Prefixes nest or are disjoint, so one sweep in address order with a stack
    of the enclosing prefixes finds each one's class from its parent's: O(n log n) plus the size
    of the classes (comparing every prefix with every peer took 10^8 subnet tests, 110 s, for
    10,000 host peers).
    """
    cidr_at: dict[IPNetwork, list[CidrPeer]] = {}
    except_at: dict[IPNetwork, list[CidrPeer]] = {}
    for peer in set(peers):
        cidr_at.setdefault(peer.cidr, []).append(peer)
        for carved in peer.excepts:
            except_at.setdefault(carved, []).append(peer)
    prefixes = cidr_at.keys() | except_at.keys()
    # IPv4 lives at ::ffff:0:0/96 of the one LPM space, so an IPv6 prefix covering it (::/0)
    # would be every IPv4 address's longest match: 0.0.0.0/0 (the /96) shadows it with the
    # IPv4 peers' own class (empty unless some peer is 0.0.0.0/0).
    if any(p.version == 6 and V4_MAPPED_SPACE.subnet_of(p) for p in prefixes):  # type: ignore[arg-type]
        prefixes.add(ipaddress.IPv4Network("0.0.0.0/0"))
    classes: dict[IPNetwork, frozenset[CidrPeer]] = {}
    for version in (4, 6):
        # (first address, prefixlen) order visits every prefix after all the prefixes enclosing it
        ordered = sorted(
            ((int(p.network_address), p.prefixlen, p) for p in prefixes if p.version == version),
            key=lambda item: (item[0], item[1]),
        )
        # enclosing prefixes: (last address, prefix, its class)
        stack: list[tuple[int, IPNetwork, frozenset[CidrPeer]]] = []
        for first, _length, prefix in ordered:
            while stack and stack[-1][0] < first:
                stack.pop()
            inherited = stack[-1][2] if stack else frozenset()
            excepted: list[CidrPeer] = except_at.get(prefix, [])
            members = inherited.difference(excepted) if excepted else inherited
            # a peer whose cidr is this prefix still misses it when one of its excepts encloses it
            joining = [p for p in cidr_at.get(prefix, []) if not p.excepts or not any(
                e.version == version and prefix.subnet_of(e) for e in p.excepts  # type: ignore[arg-type]
            )]
            if joining:
                members = members.union(joining)
            classes[prefix] = members
            stack.append((first + (1 << (prefix.max_prefixlen - _length)) - 1, prefix, members))
    return classes


@dataclass
class _Classes:
    """One answer of lpm_cidr_classes, with the indexes that let the next one be incremental."""

    peers: frozenset[CidrPeer]
    cidr_at: dict[IPNetwork, tuple[CidrPeer, ...]]  # peers by their cidr
    excepted: frozenset[IPNetwork]  # every except of every peer (their prefixes need a sweep)
    by_lpm: dict[CidrPrefix, frozenset[CidrPeer]]


_memory: list[_Classes] = []
_memory_lock = threading.Lock()


def _is_host(peer: CidrPeer) -> bool:
    return not peer.excepts and peer.cidr.prefixlen == peer.cidr.max_prefixlen


def _swept(peers: frozenset[CidrPeer]) -> _Classes:
    cidr_at: dict[IPNetwork, list[CidrPeer]] = {}
    for peer in peers:
        cidr_at.setdefault(peer.cidr, []).append(peer)
    by_lpm = {network_prefix(prefix): members for prefix, members in cidr_classes_of(peers).items()}
    excepted = frozenset(e for peer in peers for e in peer.excepts)
    return _Classes(peers, {k: tuple(v) for k, v in cidr_at.items()}, excepted, by_lpm)


def _host_class(host: IPNetwork, cidr_at: dict[IPNetwork, tuple[CidrPeer, ...]]) -> frozenset[CidrPeer]:
    """The pairwise definition for one host prefix: every peer whose cidr contains it and none
    of whose excepts does (enclosing cidrs are the host's supernets: one lookup per length)."""
    value, width = int(host.network_address), host.max_prefixlen
    # of the host's own family: ip_network() would read a small IPv6 value as IPv4
    family = ipaddress.IPv4Network if host.version == 4 else ipaddress.IPv6Network
    members = []
    for length in range(width + 1):
        supernet = family((value >> (width - length) << (width - length), length))
        for peer in cidr_at.get(supernet, ()):
            if not any(e.version == host.version and host.subnet_of(e) for e in peer.excepts):  # type: ignore[arg-type]
                members.append(peer)
    return frozenset(members)


def _updated(base: _Classes, peers: frozenset[CidrPeer]) -> _Classes | None:
    """`base` moved to `peers` when only host peers joined or left (None: sweep instead)."""
    added, removed = peers - base.peers, base.peers - peers
    changed = added | removed
    if len(changed) > MAX_INCREMENTAL_CHANGES or not all(_is_host(peer) for peer in changed):
        return None
    if any(peer.cidr in base.excepted for peer in changed):
        return None  # a host that is also some peer's except: rare, left to the sweep
    cidr_at = dict(base.cidr_at)
    for peer in removed:
        cidr_at[peer.cidr] = tuple(p for p in cidr_at[peer.cidr] if p != peer)
    for peer in added:
        cidr_at[peer.cidr] = (*cidr_at.get(peer.cidr, ()), peer)
    by_lpm = dict(base.by_lpm)
    # A host prefix encloses no other prefix: only the changed peers' own prefixes change class.
    for host in {peer.cidr for peer in changed}:
        if cidr_at[host]:
            by_lpm[network_prefix(host)] = _host_class(host, cidr_at)
        else:
            del cidr_at[host]
            del by_lpm[network_prefix(host)]
    return _Classes(peers, cidr_at, base.excepted, by_lpm)


def forget() -> None:
    """Drop the remembered answers (tests compare answers with and without them)."""
    with _memory_lock:
        _memory.clear()


def lpm_cidr_classes(peers: Iterable[CidrPeer]) -> dict[CidrPrefix, frozenset[CidrPeer]]:
    """cidr_classes_of keyed by LPM prefix (structs.network_prefix), from a remembered answer
    when a few host peers are all that changed. The caller may keep but not change the dict."""
    wanted = frozenset(peers)
    with _memory_lock:
        remembered = list(_memory)
    answer = next((c for c in remembered if c.peers == wanted), None)
    if answer is None:
        # the closest remembered answer (sizes differ by at least the changes)
        for base in sorted(remembered, key=lambda c: abs(len(c.peers) - len(wanted))):
            if abs(len(base.peers) - len(wanted)) > MAX_INCREMENTAL_CHANGES:
                break
            answer = _updated(base, wanted)
            if answer is not None:
                break
    if answer is None:
        answer = _swept(wanted)
    with _memory_lock:
        _memory[:] = [answer, *(c for c in _memory if c is not answer)][:_REMEMBERED]
    return answer.by_lpm
