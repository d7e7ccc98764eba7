"""Read one endpoint's filters back from the pinned maps and check them against the state file.

The maps hold ids only: pf_endpoints gives the endpoint's policy id per direction, pf_policy and
pf_policy_exact that policy's entries (peer class, protocol, port prefix, verdict word), pf_ipcache
and pf_cidr/pf_cidr_host the addresses and prefixes of each class (at the endpoint's generation).
The state file (state_file.py) says what each id stands for. The read-back names each peer by what
the kernel holds (its addresses or prefixes) and by what the record says it means.

The record is then checked against the kernel: the endpoint's policy ids must be those recorded
for it, and its policies' entries must be exactly what the compiler makes of the recorded content
for the classes live at the endpoint's generation (compiler.policy_entries, the function the agent
wrote them with). A tampered, lost or stray entry shows as a difference.

Counters: the datapath keeps per endpoint direction allowed/denied packets and bytes (pf_counters)
and audit-denied first packets (pf_audit_denied); a per-entry counter would be a write on every
packet of every flow, established ones included, so none is kept.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import state_file
from agent.dataplane.bpf.compiler import NOT_ISOLATED, Allocation, PolicyEntry, policy_entries
from agent.dataplane.bpf.maps import ntohs
from agent.dataplane.bpf.pinned import PinnedMap
from agent.dataplane.bpf.structs import (
    ACT_ACCEPT,
    ACT_DENY,
    ACT_PASS,
    EP_EGRESS_OPEN,
    EP_EGRESS_TIERED,
    EP_INGRESS_AUDIT,
    EP_INGRESS_OPEN,
    EP_INGRESS_TIERED,
    GENERATION_PREFIX,
    HOST_PREFIX,
    POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_PROTOCOL,
    Direction,
    PeerKind,
    address_from_bytes,
    network_from_prefix,
)
from agent.dataplane.bpf.tiered import split_leaf_value
from agent.dataplane.readback import (
    EndpointReadback,
    ProgrammedDirection,
    ProgrammedRule,
    port_ranges,
    protocol_name,
)
from agent.dataplane.types import CidrPeer

NO_ENTRY_COUNTERS = (
    "per-entry counters are not kept (one more write on every packet, established flows included): "
    "the counts above are the direction's"
)
_ACTIONS = {ACT_ACCEPT: "allow", ACT_DENY: "deny", ACT_PASS: "pass"}
_SHOWN_MEMBERS = 16  # a class's addresses or prefixes listed in text; the count says the rest
KernelEntries = dict[PolicyEntry, tuple[int, int]]  # entry -> (rule count, verdict word)


@dataclass
class _Kernel:
    """The maps' content an endpoint's read-back needs, read once."""

    policy: KernelEntries = field(default_factory=dict)
    members: dict[tuple[int, int, int], list[str]] = field(default_factory=dict)  # (gen, kind, class)


def verdict_text(word: int) -> str:
    """A tiered entry's verdict word (structs.verdict_word) in words: "admin#2 deny, baseline#0 allow"."""
    parts = []
    admin, rest = word & 3, (word >> 2) & 3
    if admin:
        parts.append(f"admin#{(word >> 4) & 0x3FFF} {_ACTIONS.get(admin, admin)}")
    if rest:
        parts.append(f"baseline#{(word >> 18) & 0x1FFF} {_ACTIONS.get(rest, rest)}")
    return ", ".join(parts) or "no tier decides"


def _read_kernel(pin_dir: str, policy_ids: set[int]) -> _Kernel:
    """The entries of `policy_ids` and every class's members (the maps walked whole: ~1.5 s for
    10,000 peers); nothing for an endpoint whose directions are all open."""
    kernel = _Kernel()
    if not policy_ids:
        return kernel
    for name in ("pf_policy", "pf_policy_exact"):
        with PinnedMap(pin_dir, name) as table:
            for key, value in table.items():
                if key.policy_id in policy_ids:
                    entry = (key.prefixlen, key.policy_id, key.peer_class, key.peer_kind, key.protocol,
                             ntohs(key.dport_be))  # fmt: skip
                    kernel.policy[entry] = (value.rule_count, value.verdict)
    with PinnedMap(pin_dir, "pf_ipcache") as table:
        for key, value in table.items():
            address = str(address_from_bytes(bytes(key.addr.bytes)))
            kernel.members.setdefault((key.generation, PeerKind.IDENTITY, value.class_id), []).append(address)
    for name, host in (("pf_cidr", False), ("pf_cidr_host", True)):
        with PinnedMap(pin_dir, name) as table:
            for key, value in table.items():
                length = HOST_PREFIX if host else key.prefixlen - GENERATION_PREFIX
                prefix = str(network_from_prefix(length, bytes(key.addr.bytes)))
                kernel.members.setdefault((key.generation, PeerKind.CIDR, value.class_id), []).append(prefix)
    return kernel


def _meanings(allocation: Allocation | None) -> dict[tuple[int, int], str]:
    """(kind, class id) -> what the record says the class stands for."""
    if allocation is None:
        return {}
    meanings: dict[tuple[int, int], str] = {}
    for identities, class_id in allocation.identity_classes.items():
        meanings[(PeerKind.IDENTITY, class_id)] = "identities " + ", ".join(
            str(i) for i in sorted(identities)
        )
    for peers, class_id in allocation.cidr_classes.items():
        meanings[(PeerKind.CIDR, class_id)] = "cidr " + "; ".join(sorted(_peer_text(p) for p in peers))
    return meanings


def _peer_text(peer: CidrPeer) -> str:
    if not peer.excepts:
        return str(peer.cidr)
    return f"{peer.cidr} except {', '.join(str(e) for e in peer.excepts)}"


def _members_text(members: list[str]) -> str:
    if not members:
        return "no address at this generation"
    shown = ", ".join(sorted(members)[:_SHOWN_MEMBERS])
    more = len(members) - _SHOWN_MEMBERS
    return shown + (f" and {more} more" if more > 0 else "")


def _port_range(entry: PolicyEntry) -> tuple[int, int]:
    prefixlen, port = entry[0], entry[5]
    bits = prefixlen - POLICY_PREFIX_PROTOCOL
    return port, port + (1 << (16 - bits)) - 1


def decode_rules(
    entries: KernelEntries, generation: int, kernel: _Kernel, meanings: dict[tuple[int, int], str]
) -> list[ProgrammedRule]:
    """One rule per (peer class, protocol, verdict): its entries' port prefixes joined into ranges."""
    grouped: dict[tuple[int, int, int, int], list[tuple[int, int]]] = {}
    for entry, (_rule_count, verdict) in entries.items():
        prefixlen, _pid, class_id, kind, protocol, _port = entry
        any_protocol = prefixlen == POLICY_PREFIX_ANY_PROTOCOL
        group = (kind, class_id, 0 if any_protocol else protocol, verdict)
        grouped.setdefault(group, []).append((0, 65535) if any_protocol else _port_range(entry))
    rules = []
    for group in sorted(grouped):
        kind, class_id, protocol, verdict = group
        members = kernel.members.get((generation, kind, class_id), [])
        what = "identity class" if kind == PeerKind.IDENTITY else "cidr class"
        rules.append(
            ProgrammedRule(
                peer=f"{what} {class_id}: {_members_text(members)}",
                protocol=protocol_name(protocol),
                ports=port_ranges(grouped[group]),
                action=verdict_text(verdict) if verdict else "allow",
                meaning=meanings.get((kind, class_id), "not in the state file"),
                detail=f"{len(grouped[group])} kernel entries",
            )
        )
    return rules


def expected_entries(
    allocation: Allocation, policy_id: int, generation: int, kernel: _Kernel
) -> dict[PolicyEntry, int] | None:
    """The entries the compiler makes of policy `policy_id`'s recorded content for the classes
    that hold addresses at `generation` (a class without any is not written); None when the
    record does not know the id."""
    content = next((c for c, pid in allocation.policies.items() if pid == policy_id), None)
    if content is None:
        return None
    live = {(kind, class_id) for (gen, kind, class_id) in kernel.members if gen == generation}
    identity_classes = {ids: cid for ids, cid in allocation.identity_classes.items()
                        if (PeerKind.IDENTITY, cid) in live}  # fmt: skip
    cidr_classes = {
        peers: cid for peers, cid in allocation.cidr_classes.items() if (PeerKind.CIDR, cid) in live
    }
    return policy_entries({content: policy_id}, identity_classes, cidr_classes)


def entry_text(entry: PolicyEntry) -> str:
    prefixlen, policy_id, class_id, kind, protocol, _port = entry
    what = "identity class" if kind == PeerKind.IDENTITY else "cidr class"
    if prefixlen == POLICY_PREFIX_ANY_PROTOCOL:
        ports = "any protocol"
    else:
        ports = f"{protocol_name(protocol)} {port_ranges([_port_range(entry)])}"
    return f"policy {policy_id} entry {ports} for {what} {class_id}"


def compare_entries(label: str, kernel_entries: KernelEntries, expected: dict[PolicyEntry, int]) -> list[str]:
    """Differences between a policy's entries in the kernel and those the record implies."""
    found = []
    for entry in sorted(expected.keys() - kernel_entries.keys()):
        found.append(f"{label}: {entry_text(entry)} is recorded but missing in the kernel")
    for entry in sorted(kernel_entries.keys() - expected.keys()):
        found.append(f"{label}: {entry_text(entry)} is in the kernel but not recorded")
    for entry in sorted(kernel_entries.keys() & expected.keys()):
        want = split_leaf_value(expected[entry])[1]
        have = kernel_entries[entry][1]
        if want != have:
            found.append(
                f"{label}: {entry_text(entry)} decides {verdict_text(have) if have else 'allow'}, "
                f"recorded {verdict_text(want) if want else 'allow'}"
            )
    return found


def _counters(pin_dir: str, slot: int, direction: Direction, target: ProgrammedDirection) -> None:
    index = ctypes.c_uint32(slot * 2 + direction)
    with PinnedMap(pin_dir, "pf_counters", per_cpu=True) as table:
        values = table.lookup(index) or []
    target.allowed_packets = sum(v.allowed_packets for v in values)
    target.allowed_bytes = sum(v.allowed_bytes for v in values)
    target.denied_packets = sum(v.denied_packets for v in values)
    target.denied_bytes = sum(v.denied_bytes for v in values)
    with PinnedMap(pin_dir, "pf_audit_denied", per_cpu=True) as table:
        target.audit_denied = sum(int(v.value) for v in table.lookup(index) or [])


def _find_endpoint(pin_dir: str, slot: int) -> tuple[int, Any] | None:
    with PinnedMap(pin_dir, "pf_endpoints") as table:
        for key, value in table.items():
            if value.endpoint_id == slot:
                return int(key.ifindex), value
    return None


def _audit_views(pin_dir: str, slot: int, flags: int) -> dict[Direction, int]:
    """direction -> the policy id of its audit view (pf_audit[slot]): ingress only, the one view
    the kernel holds (an egress audit view is the agent's, judged from the flow's record)."""
    if not flags & EP_INGRESS_AUDIT:
        return {}
    with PinnedMap(pin_dir, "pf_audit") as table:
        found = table.lookup(ctypes.c_uint32(slot))
        return {Direction.INGRESS: found[0].policy_id if found else NOT_ISOLATED}


def _policy_view(
    label: str,
    policy_id: int,
    allocation: Allocation,
    generation: int,
    kernel: _Kernel,
    meanings: dict[tuple[int, int], str],
) -> tuple[list[ProgrammedRule], list[str]]:
    """The rules of one policy id as the kernel holds them, and where they differ from the record."""
    if policy_id == NOT_ISOLATED:
        return [], []
    entries = {e: v for e, v in kernel.policy.items() if e[1] == policy_id}
    rules = decode_rules(entries, generation, kernel, meanings)
    expected = expected_entries(allocation, policy_id, generation, kernel)
    if expected is None:
        return rules, [f"{label}: policy id {policy_id} is not in the state file"]
    return rules, compare_entries(label, entries, expected)


def _mode(flags: int, open_flag: int, tiered_flag: int, policy_id: int) -> str:
    isolated = not flags & open_flag
    tiered = bool(flags & tiered_flag)
    if tiered:
        return "isolated+tiered" if isolated else "tiered"
    if policy_id == NOT_ISOLATED and not isolated:
        return "open"
    return "isolated"


def read_endpoint(pin_dir: str, state_path: Path, key: str) -> EndpointReadback:
    """What the kernel holds for endpoint `key` ("namespace/name"), and where it differs from
    the state file. Raises PermanentDataplaneError when the record or the maps do not know it."""
    allocation = state_file.allocation_from_json(state_file.read(state_path))
    if allocation is None:
        raise PermanentDataplaneError(
            f"no readable bpf state file at {state_path}: is the bpf agent running?"
        )
    slot = allocation.endpoint_slots.get(key)
    if slot is None:
        raise PermanentDataplaneError(f"the bpf state file has no endpoint {key}")
    found = _find_endpoint(pin_dir, slot)
    readback = EndpointReadback("bpf", key, found[0] if found else None)
    if found is None:
        readback.differences.append(f"slot {slot} of {key} has no pf_endpoints entry (no interface yet?)")
        return readback
    value = found[1]
    audits = _audit_views(pin_dir, slot, value.flags)
    policy_ids = {value.ingress_policy_id, value.egress_policy_id, *audits.values()} - {NOT_ISOLATED}
    kernel = _read_kernel(pin_dir, policy_ids)
    meanings = _meanings(allocation)
    recorded = allocation.endpoint_policy_ids.get(key)
    sides = (
        (Direction.INGRESS, value.ingress_policy_id, EP_INGRESS_OPEN, EP_INGRESS_TIERED),
        (Direction.EGRESS, value.egress_policy_id, EP_EGRESS_OPEN, EP_EGRESS_TIERED),
    )
    for direction, policy_id, open_flag, tiered_flag in sides:
        label = direction.name.lower()
        target = ProgrammedDirection(label, _mode(value.flags, open_flag, tiered_flag, policy_id))
        views = [(label, policy_id, "")]
        if direction in audits:
            views.append((f"{label} audit view", audits[direction], "audit: "))
            target.notes.append(
                f"audit view: policy id {audits[direction]}, its verdicts recorded, never enforced"
            )
        for view, view_policy, prefix in views:
            rules, differences = _policy_view(
                view, view_policy, allocation, value.generation, kernel, meanings
            )
            target.rules += [replace(rule, action=prefix + rule.action) for rule in rules]
            readback.differences += differences
        if policy_id != NOT_ISOLATED:
            target.notes.append(f"policy id {policy_id}, peer generation {value.generation}")
        target.notes.append(NO_ENTRY_COUNTERS)
        _counters(pin_dir, slot, direction, target)
        readback.directions.append(target)
        if recorded is not None and recorded[direction] != policy_id:
            readback.differences.append(
                f"{label}: the kernel reads policy id {policy_id}, the record says {recorded[direction]}"
            )
    with PinnedMap(pin_dir, "pf_endpoint_ips") as table:
        readback.addresses = sorted(
            str(address_from_bytes(bytes(k.bytes))) for k, v in table.items() if v.ifindex == found[0]
        )
    return readback
