"""The eBPF dataplane compiler: NodeState in, desired map contents out. Pure (no I/O).

It turns allow lists into the shapes bpf/lib/policy.h looks up in bounded time:
- identities referenced by some allow become *identity classes*: an address carrying identities
  {3, 7} maps (ipcache) to the class id of that set;
- CidrPeers (cidr minus excepts) become *CIDR classes*: every cidr and except is an LPM prefix,
  and each prefix maps to the set of peers containing the addresses whose longest match it is;
- each distinct allow list (DirectionPolicy content, whatever the direction) gets one policy id
  (dedup), and expands to policy LPM entries (policy, kind, class, protocol, port prefix), a port
  range becoming at most 30 prefixes.

Ids are allocated against the previous `Allocation` so unchanged content keeps its id (no churn)
and vanished ids are never reused, which is what lets the writer build the new state beside the
old one. Endpoint counter slots are the exception: a bounded array, reused once free.
Peer classes are written per generation by the writer (plan.py), so the compiler's output is
generation-free.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.dataplane.bpf.cidr_classes import CidrPrefix, lpm_cidr_classes
from agent.dataplane.bpf.structs import (
    AUDIT_OPEN,
    AUDIT_TIERED,
    EP_EGRESS_OPEN,
    EP_EGRESS_TIERED,
    EP_INGRESS_AUDIT,
    EP_INGRESS_OPEN,
    EP_INGRESS_TIERED,
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    PeerKind,
    addr_bytes,
)

if TYPE_CHECKING:  # entry_memo.py builds on this module
    from agent.dataplane.bpf.entry_memo import EntryMemo
from agent.dataplane.bpf.tiered import TieredRule, cell_entries, is_tiered, tiered_rule
from agent.dataplane.types import (
    PROTO_ANY,
    Allow,
    CidrPeer,
    DirectionPolicy,
    IdentityPeer,
    IPNetwork,
    NodeState,
)

# (protocol, port_first, port_last, peer): the part of an Allow that decides verdicts; a tiered
# rule (ClusterNetworkPolicy) adds (tier, rank, action), see tiered.py
Rule = tuple[int, int, int, CidrPeer | IdentityPeer] | TieredRule
PolicyContent = frozenset[Rule]
# (prefixlen, policy_id, peer_class, peer_kind, protocol, dport): one policy LPM entry
PolicyEntry = tuple[int, int, int, int, int, int]

NOT_ISOLATED = 0  # policy id meaning "this direction allows everything"


@dataclass(frozen=True)
class Allocation:
    """Ids handed out so far, with the content each one stands for."""

    policies: dict[PolicyContent, int] = field(default_factory=dict)
    identity_classes: dict[frozenset[int], int] = field(default_factory=dict)
    cidr_classes: dict[frozenset[CidrPeer], int] = field(default_factory=dict)
    endpoint_slots: dict[str, int] = field(default_factory=dict)
    # endpoint key -> (ingress, egress) policy ids, so that a changed allow list keeps its id
    endpoint_policy_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    next_id: int = 1  # shared counter for policy and class ids; never reused


@dataclass(frozen=True)
class EndpointEntry:
    endpoint_key: str
    endpoint_id: int
    ingress_policy_id: int
    egress_policy_id: int
    generation: int = 0  # peer-map generation; chosen by the writer's plan, not the compiler
    mac: bytes = bytes(6)  # the pod's MAC; all zero: not bound
    flags: int = 0  # structs.EP_*: per direction, tiered verdicts / allowed when no entry decides


@dataclass(frozen=True)
class Desired:
    """Everything the maps must hold for one NodeState (python-level keys, host order)."""

    endpoints: dict[int, EndpointEntry]  # ifindex -> endpoint
    endpoint_ips: dict[bytes, int]  # address -> ifindex
    node_ips: frozenset[bytes]
    ipcache: dict[bytes, int]  # address -> identity class
    cidr: dict[CidrPrefix, int]  # prefix -> cidr class (0 = no peer)
    policy: dict[PolicyEntry, int]  # entry -> tiered.leaf_value (rules producing it, verdict)
    allocation: Allocation
    interfaces: frozenset[int]  # every ifindex to guard
    # endpoint_id -> (policy id, structs.AUDIT_*) of the audit view of each endpoint ingress that
    # has one (bpf/lib/audit.h); egress audit views are the agent's (flow_records.py), not the kernel's
    audit: dict[int, tuple[int, int]] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)
def port_range_prefixes(first: int, last: int) -> tuple[tuple[int, int], ...]:
    """Cover [first, last] of the 16-bit port space with (value, prefix bits) blocks, largest first."""
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"invalid port range {first}-{last}")
    blocks: list[tuple[int, int]] = []
    start = first
    while start <= last:
        size_bits = 16
        # the largest aligned block starting at `start` that does not pass `last`
        while size_bits > 0 and (start & ((1 << size_bits) - 1) or start + (1 << size_bits) - 1 > last):
            size_bits -= 1
        blocks.append((start, 16 - size_bits))
        start += 1 << size_bits
    return tuple(blocks)


def policy_content(direction: DirectionPolicy) -> PolicyContent | None:
    """The verdict-relevant content of a direction; None when nothing restricts it."""
    if not direction.judged:
        return None
    rules: set[Rule] = {_rule(allow) for allow in direction.allows}
    rules.update(tiered_rule(entry) for entry in direction.tiered)
    return frozenset(rules)


def endpoint_flags(ingress: DirectionPolicy, egress: DirectionPolicy) -> int:
    flags = 0 if ingress.isolated else EP_INGRESS_OPEN
    flags |= 0 if egress.isolated else EP_EGRESS_OPEN
    flags |= EP_INGRESS_TIERED if ingress.tiered else 0
    flags |= EP_INGRESS_AUDIT if ingress.audit is not None else 0
    return flags | (EP_EGRESS_TIERED if egress.tiered else 0)


def audit_flags(audit: DirectionPolicy) -> int:
    """pf_audit_value.flags of an audit view: as the endpoint's flags say of its own direction."""
    return (0 if audit.isolated else AUDIT_OPEN) | (AUDIT_TIERED if audit.tiered else 0)


def _rule(allow: Allow) -> Rule:
    if allow.protocol == PROTO_ANY:
        return (PROTO_ANY, 0, 65535, allow.peer)
    return (allow.protocol, allow.port_first, allow.port_last, allow.peer)


def peer_sort_key(peer: CidrPeer) -> tuple[int, str]:
    """A total order over peers of both families (IPv4Network and IPv6Network do not compare)."""
    return (peer.cidr.version, str(peer))


def policy_entries(
    policies: dict[PolicyContent, int],
    identity_classes: dict[frozenset[int], int],
    cidr_classes: dict[frozenset[CidrPeer], int],
) -> dict[PolicyEntry, int]:
    """Policy LPM entries for every policy against every class."""
    identity_members: dict[int, list[int]] = {}
    for identities, class_id in identity_classes.items():
        for identity in identities:
            identity_members.setdefault(identity, []).append(class_id)
    cidr_members: dict[CidrPeer, list[int]] = {}
    for members, class_id in cidr_classes.items():
        for member in members:
            cidr_members.setdefault(member, []).append(class_id)
    return entries_for_members(policies, identity_members, cidr_members)


def entries_for_members(
    policies: dict[PolicyContent, int],
    identity_members: dict[int, list[int]],
    cidr_members: dict[CidrPeer, list[int]],
) -> dict[PolicyEntry, int]:
    """Policy LPM entries given, for each identity and CIDR peer, the class ids containing it.

    The port ranges of all rules that land on one (policy, class, protocol) are merged before
    they are split into prefixes: adjacent and overlapping ranges cost one cover (1-1000 and
    1001-2000 are 1-2000: 16 prefixes, not 25), and ranges under an every-protocol allow of the
    same class cost nothing (the 72-bit entry already matches them). Each entry counts the rules
    that produced it (pf_policy_value.rule_count, informational)."""
    entries: dict[PolicyEntry, int] = {}
    for content, policy_id in policies.items():
        if is_tiered(content):
            entries.update(_tiered_entries(policy_id, content, identity_members, cidr_members))
            continue
        groups: dict[tuple[int, int], list[Rule]] = {}
        for rule in content:
            kind, classes = _classes_of(rule[3], identity_members, cidr_members)
            for class_id in classes:
                groups.setdefault((class_id, kind), []).append(rule)
        for (class_id, kind), rules in groups.items():
            entries.update(group_entries(policy_id, class_id, kind, rules))
    return entries


def group_entries(policy_id: int, class_id: int, kind: int, rules: list[Rule]) -> dict[PolicyEntry, int]:
    """The entries of one plain policy on one class: `rules` are those of its rules whose peer is
    a member of the class (entry_memo.py recomputes one such group when a patch touches it)."""
    if len(rules) == 1:  # most groups: nothing to merge
        protocol, first, last = rules[0][:3]
        if protocol == PROTO_ANY:
            return {(POLICY_PREFIX_ANY_PROTOCOL, policy_id, class_id, kind, 0, 0): 1}
        return {
            (POLICY_PREFIX_PROTOCOL + bits, policy_id, class_id, kind, protocol, value): 1
            for value, bits in port_range_prefixes(first, last)
        }
    anys = sum(1 for rule in rules if rule[0] == PROTO_ANY)
    if anys:  # the every-protocol entry already matches every port of every protocol
        return {(POLICY_PREFIX_ANY_PROTOCOL, policy_id, class_id, kind, 0, 0): anys}
    spans: dict[int, list[tuple[int, int]]] = {}
    for rule in rules:
        spans.setdefault(rule[0], []).append((rule[1], rule[2]))
    entries: dict[PolicyEntry, int] = {}
    for protocol, ranges in spans.items():
        for first, last, count in merge_port_ranges(ranges):
            for value, bits in port_range_prefixes(first, last):
                entries[(POLICY_PREFIX_PROTOCOL + bits, policy_id, class_id, kind, protocol, value)] = count
    return entries


def _classes_of(
    peer: CidrPeer | IdentityPeer,
    identity_members: dict[int, list[int]],
    cidr_members: dict[CidrPeer, list[int]],
) -> tuple[int, list[int]]:
    """(peer kind, the class ids that contain `peer`)."""
    if isinstance(peer, IdentityPeer):
        return PeerKind.IDENTITY, identity_members.get(peer.identity, [])
    return PeerKind.CIDR, cidr_members.get(peer, [])


def _tiered_entries(
    policy_id: int,
    content: PolicyContent,
    identity_members: dict[int, list[int]],
    cidr_members: dict[CidrPeer, list[int]],
) -> dict[PolicyEntry, int]:
    """A tiered policy's entries: its rules gathered per (class, kind), overlaps resolved there."""
    cells: dict[tuple[int, int], list[Rule]] = {}
    for rule in content:
        kind, classes = _classes_of(rule[3], identity_members, cidr_members)
        for class_id in classes:
            cells.setdefault((class_id, kind), []).append(rule)
    entries: dict[PolicyEntry, int] = {}
    for (class_id, kind), rules in cells.items():
        entries.update(cell_entries(policy_id, class_id, kind, rules, port_range_prefixes))
    return entries


def merge_port_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Overlapping and adjacent [first, last] ranges joined: (first, last, ranges joined) in order."""
    merged: list[tuple[int, int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            start, end, count = merged[-1]
            merged[-1] = (start, max(end, last), count + 1)
        else:
            merged.append((first, last, 1))
    return merged


def _inherited_policy_ids(
    endpoint_contents: dict[str, tuple[PolicyContent | None, PolicyContent | None]],
    previous: Allocation,
    audit_contents: set[PolicyContent] | frozenset[PolicyContent] = frozenset(),
) -> dict[PolicyContent, int]:
    """New contents that keep the id of the content they replace: when every endpoint direction
    that read id P now has content B, B is new and P's old content is gone, B takes P. Its
    entries then change in place (one peer added to a 10,000-peer list is a few entries, not
    10,000 under a fresh id), and no endpoint flips, so nothing reads P's entries through
    another view than its own (transition.py)."""
    old_contents = {pid: content for content, pid in previous.policies.items()}
    # audit views read ids too (pf_audit): an id whose content one still reads is not rewritten
    live_contents = {content for pair in endpoint_contents.values() for content in pair} | set(audit_contents)
    readers: dict[int, set[PolicyContent | str | None]] = {}
    for key, old_pair in previous.endpoint_policy_ids.items():
        new_pair: tuple[PolicyContent | str | None, ...] = endpoint_contents.get(key, ("gone", "gone"))
        for old_id, content in zip(old_pair, new_pair, strict=True):
            if old_id != NOT_ISOLATED:
                readers.setdefault(old_id, set()).add(content)
    inherited: dict[PolicyContent, int] = {}
    for pid, now_read in readers.items():
        if len(now_read) != 1:
            continue
        (content,) = now_read
        if (
            isinstance(content, frozenset)
            # a tiered entry's value changes with its content: never rewritten in place
            and not is_tiered(content)
            and not is_tiered(old_contents.get(pid, ()))
            and content not in previous.policies
            and content not in inherited
            and old_contents.get(pid) not in live_contents
        ):
            inherited[content] = pid
    return inherited


def compile_node_state(
    state: NodeState, previous: Allocation | None = None, inherit: bool = True, memo: EntryMemo | None = None
) -> Desired:
    """Desired map contents for `state`, reusing the ids of `previous` for unchanged content (and,
    with `inherit`, for a changed allow list all of whose readers move together). With `memo`,
    policy entries are those of its last answer updated by what changed (entry_memo.py)."""
    previous = previous or Allocation()
    counter = [previous.next_id]

    def fresh_id() -> int:
        # ids only grow: an id freed by this update may still be live until the writer's sweep
        counter[0] += 1
        return counter[0] - 1

    # policies: dedupe by content across endpoints and directions
    # endpoints selected by the same policies share one DirectionPolicy object (the node layer
    # decodes equal lists once): build and hash each content once, not once per endpoint
    contents: dict[int, tuple[DirectionPolicy, PolicyContent | None]] = {}
    endpoint_contents: dict[str, tuple[PolicyContent | None, PolicyContent | None]] = {}
    for key, endpoint in sorted(state.endpoints.items()):
        found = []
        for direction in (endpoint.ingress, endpoint.egress):
            known = contents.get(id(direction))
            if known is None:
                known = contents[id(direction)] = (direction, policy_content(direction))
            found.append(known[1])
        endpoint_contents[key] = (found[0], found[1])
    # ingress audit views (bpf/lib/audit.h): their contents get policy ids like any other, never in
    # place. Egress ones are judged by the agent from the flow's record: nothing in the kernel.
    audit_contents: dict[str, PolicyContent | None] = {}
    for key, endpoint in sorted(state.endpoints.items()):
        audit_view = endpoint.ingress.audit
        if audit_view is not None:
            known = contents.get(id(audit_view))
            if known is None:
                known = contents[id(audit_view)] = (audit_view, policy_content(audit_view))
            audit_contents[key] = known[1]
    read_by_audit = {c for c in audit_contents.values() if c is not None}
    inherited = _inherited_policy_ids(endpoint_contents, previous, read_by_audit) if inherit else {}
    policies: dict[PolicyContent, int] = {}
    endpoint_policy_ids: dict[str, tuple[int, int]] = {}
    for key, pair in endpoint_contents.items():
        ids = []
        for content in pair:
            if content is None:
                ids.append(NOT_ISOLATED)
                continue
            if content not in policies:
                policies[content] = previous.policies.get(content) or inherited.get(content) or fresh_id()
            ids.append(policies[content])
        endpoint_policy_ids[key] = (ids[0], ids[1])
    audit_ids: dict[str, int] = {}
    for ref, content in audit_contents.items():
        if content is None:
            audit_ids[ref] = NOT_ISOLATED
            continue
        if content not in policies:
            policies[content] = previous.policies.get(content) or fresh_id()
        audit_ids[ref] = policies[content]

    referenced_identities: set[int] = set()
    referenced_cidrs: set[CidrPeer] = set()
    for content in policies:
        for rule in content:
            peer = rule[3]
            if isinstance(peer, IdentityPeer):
                referenced_identities.add(peer.identity)
            else:
                referenced_cidrs.add(peer)

    # identity classes: the set of referenced identities each address carries
    identities_of_address: dict[bytes, set[int]] = {}
    for identity, addresses in state.identities.items():
        if identity not in referenced_identities:
            continue
        for address in addresses:
            identities_of_address.setdefault(addr_bytes(address), set()).add(identity)
    identity_classes: dict[frozenset[int], int] = {}
    ipcache: dict[bytes, int] = {}
    for raw_address, identity_set in sorted(identities_of_address.items()):
        frozen = frozenset(identity_set)
        if frozen not in identity_classes:
            identity_classes[frozen] = previous.identity_classes.get(frozen) or fresh_id()
        ipcache[raw_address] = identity_classes[frozen]

    # CIDR classes
    cidr_classes: dict[frozenset[CidrPeer], int] = {}
    cidr: dict[CidrPrefix, int] = {}
    unnamed: list[tuple[CidrPrefix, frozenset[CidrPeer]]] = []
    for lpm_prefix, peers in lpm_cidr_classes(referenced_cidrs).items():
        if not peers:
            cidr[lpm_prefix] = 0
        elif peers in cidr_classes:
            cidr[lpm_prefix] = cidr_classes[peers]
        elif peers in previous.cidr_classes:
            cidr[lpm_prefix] = cidr_classes[peers] = previous.cidr_classes[peers]
        else:
            unnamed.append((lpm_prefix, peers))
    # fresh ids in the datapath's address order, so that they do not depend on hash order (only
    # the new classes are sorted: one peer changed among 10,000 sorts one prefix)
    for lpm_prefix, peers in sorted(unnamed):
        if peers not in cidr_classes:
            cidr_classes[peers] = fresh_id()
        cidr[lpm_prefix] = cidr_classes[peers]

    # endpoints and their counter slots (slots of endpoints still present are kept)
    slots: dict[str, int] = {k: v for k, v in previous.endpoint_slots.items() if k in state.endpoints}
    used = set(slots.values())
    next_slot = 0
    endpoints: dict[int, EndpointEntry] = {}
    endpoint_ips: dict[bytes, int] = {}
    audit: dict[int, tuple[int, int]] = {}
    for key, endpoint in sorted(state.endpoints.items()):
        if key not in slots:
            while next_slot in used:
                next_slot += 1
            slots[key] = next_slot
            used.add(next_slot)
        if endpoint.ifindex is None:
            continue
        ingress_id, egress_id = endpoint_policy_ids[key]
        mac = bytes.fromhex(endpoint.mac.replace(":", "")) if endpoint.mac else bytes(6)
        flags = endpoint_flags(endpoint.ingress, endpoint.egress)
        endpoints[endpoint.ifindex] = EndpointEntry(
            key, slots[key], ingress_id, egress_id, mac=mac, flags=flags
        )
        if endpoint.ingress.audit is not None:
            audit[slots[key]] = (audit_ids[key], audit_flags(endpoint.ingress.audit))
        for address in endpoint.ips:
            endpoint_ips[addr_bytes(address)] = endpoint.ifindex

    allocation = Allocation(
        policies=policies,
        identity_classes=identity_classes,
        cidr_classes=cidr_classes,
        endpoint_slots=slots,
        endpoint_policy_ids=endpoint_policy_ids,
        next_id=counter[0],
    )
    return Desired(
        endpoints=endpoints,
        endpoint_ips=endpoint_ips,
        node_ips=frozenset(addr_bytes(address) for address in state.node_ips),
        ipcache=ipcache,
        cidr=cidr,
        policy=(
            memo.entries_for(policies, identity_classes.items(), cidr_classes.items())
            if memo is not None
            else policy_entries(policies, identity_classes, cidr_classes)
        ),
        allocation=allocation,
        interfaces=frozenset(state.pod_interfaces) | frozenset(endpoints),
        audit=audit,
    )


def ip_network(prefix: CidrPrefix) -> IPNetwork:
    """Inverse of structs.network_prefix, for messages and tests."""
    length, raw = prefix
    v6 = ipaddress.IPv6Address(raw)
    if v6.ipv4_mapped is not None and length >= 96:
        return ipaddress.IPv4Network((v6.ipv4_mapped, length - 96))
    return ipaddress.IPv6Network((v6, length))
