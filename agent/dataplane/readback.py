"""What one endpoint's filters hold in the kernel, read back from it (`podfence inspect`).

Both dataplanes answer in this shape: per direction, the programmed allow list (each entry's
peer, protocol, ports and, where tiered, tier/rank/action) with the counters the kernel keeps,
and the differences between the kernel and the dataplane's own record of what it programmed.
Peers are named as the kernel holds them (addresses, prefixes, set members); what they stand for
(identities, CIDR peers) comes from the dataplane's record and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgrammedRule:
    peer: str  # as the kernel matches it: "10.0.0.2, fd00::2", "10.1.0.0/16", "set pf-i4-7 {..}"
    protocol: str  # "tcp", "udp", "any", a number
    ports: str  # "8080", "1000-2000, 3000", "any"
    action: str = "allow"  # allow | deny | pass | "admin#3 deny, baseline#0 allow" where tiered
    meaning: str = ""  # what the peer stands for per the dataplane's record ("identities 101")
    packets: int | None = None  # None: the kernel keeps no counter for this entry
    bytes: int | None = None
    detail: str = ""  # where it sits: its family and chain (iptables), its number of map entries (bpf)


@dataclass
class ProgrammedDirection:
    direction: str  # ingress (to the pod) | egress (from the pod)
    mode: str  # "open" (everything passes), "isolated", "tiered", "isolated+tiered"
    rules: list[ProgrammedRule] = field(default_factory=list)
    allowed_packets: int = 0
    allowed_bytes: int = 0
    denied_packets: int = 0
    denied_bytes: int = 0
    audit_denied: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "per-entry counters are not kept"


@dataclass
class EndpointReadback:
    dataplane: str
    key: str
    ifindex: int | None
    addresses: list[str] = field(default_factory=list)  # the pod's own (source) addresses bound
    directions: list[ProgrammedDirection] = field(default_factory=list)
    # where the kernel differs from the dataplane's record of what it programmed
    differences: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def port_ranges(ranges: list[tuple[int, int]]) -> str:
    """ "8080", "1000-2000, 3000" from [first, last] ranges; "any" for all 0-65535."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    if merged == [[0, 65535]]:
        return "any"
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in merged)


PROTOCOL_NAMES = {0: "any", 1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def format_readback(readback: EndpointReadback) -> str:
    """A table for people: per direction, its mode, counters and entries."""
    lines = [
        f"{readback.key} on interface {readback.ifindex} "
        f"({readback.dataplane} dataplane, read from the kernel)",
        f"  addresses: {', '.join(readback.addresses) or 'none bound'}",
    ]
    for direction in readback.directions:
        lines.append(
            f"  {direction.direction}: {direction.mode}; allowed {direction.allowed_packets} packets "
            f"({direction.allowed_bytes} bytes), denied {direction.denied_packets} packets "
            f"({direction.denied_bytes} bytes)"
            + (f", audit-denied {direction.audit_denied}" if direction.audit_denied else "")
        )
        for rule in direction.rules:
            counted = "" if rule.packets is None else f"  [{rule.packets} packets, {rule.bytes} bytes]"
            meaning = f" ({rule.meaning})" if rule.meaning else ""
            detail = f"  {rule.detail}" if rule.detail else ""
            head = f"    {rule.action:<8} {rule.protocol:<9} {rule.ports:<14}"
            lines.append(f"{head} {rule.peer}{meaning}{counted}{detail}")
        lines += [f"    note: {note}" for note in direction.notes]
    if readback.differences:
        lines.append("  DIFFERS from what the agent recorded it programmed:")
        lines += [f"    - {difference}" for difference in readback.differences]
    else:
        lines.append("  the kernel holds what the agent recorded it programmed")
    return "\n".join(lines)
