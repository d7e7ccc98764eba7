"""Python mirrors of bpf/podfence.h: ctypes Structures for every map key/value and IntEnums for
the direction/peer-kind codes (the drop reasons, shared by both dataplanes, are
agent.dataplane.types.Reason). tests/privileged/test_bpf_mirror.py checks them against the
compiled program. Byte order lives in field names; `addr_bytes` is the one place that turns an
ipaddress object into the 16-byte (v4-mapped) form the datapath uses.
"""

from __future__ import annotations

import ctypes
import ipaddress
from enum import IntEnum

from agent.dataplane.types import REASON_MAX, IPAddress, IPNetwork, Reason


class Direction(IntEnum):
    INGRESS = 0
    EGRESS = 1


class PeerKind(IntEnum):
    IDENTITY = 1
    CIDR = 2


# Conntrack flags, per way of a flow; the ways relative to the canonical key (end a < end b).
CT_EGRESS_OK = 0x01
CT_INGRESS_OK = 0x02
CT_FROM_POD = 0x04
WAY_AB = 0
WAY_BA = 1
# CtValue.closing: what of a TCP flow's end was seen
CT_FIN_AB = 0x01
CT_FIN_BA = 0x02
CT_RST = 0x04
# Conntrack idle timeouts in seconds (bpf/lib/common.h PF_CT_TIMEOUT_*), by IP protocol; the
# agent's count of live entries (dataplane.release_conntrack) expires entries as the datapath does.
CT_TIMEOUT_TCP, CT_TIMEOUT_TCP_CLOSING, CT_TIMEOUT_UDP = 7200, 10, 120
CT_TIMEOUT_SCTP, CT_TIMEOUT_ICMP, CT_TIMEOUT_OTHER = 7200, 30, 120
CT_TIMEOUTS = {  # by IP protocol number; any other: CT_TIMEOUT_OTHER
    6: CT_TIMEOUT_TCP,
    17: CT_TIMEOUT_UDP,
    132: CT_TIMEOUT_SCTP,
    1: CT_TIMEOUT_ICMP,
    58: CT_TIMEOUT_ICMP,
}

# Bits of the policy LPM key before the protocol byte: policy_id + peer_class + peer_kind.
POLICY_PREFIX_ANY_PROTOCOL = 72
POLICY_PREFIX_PROTOCOL = 80
POLICY_PREFIX_FULL = 96
V4_MAPPED_PREFIX = 96
GENERATION_PREFIX = 32  # the CIDR LPM key's generation field, always matched exactly
HOST_PREFIX = 128  # a host prefix (/32 as 96 + 32, /128): kept in pf_cidr_host, not the trie


class Addr(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint8 * 16)]


class EndpointKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32)]


class EndpointValue(ctypes.Structure):
    _fields_ = [
        ("endpoint_id", ctypes.c_uint32),
        ("ingress_policy_id", ctypes.c_uint32),
        ("egress_policy_id", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * 6),  # all zero: no MAC bound
        ("flags", ctypes.c_uint8),  # EP_* below
        ("pad", ctypes.c_uint8),
    ]


# pf_endpoint_value.flags (bpf/podfence.h PF_EP_*)
EP_INGRESS_OPEN, EP_EGRESS_OPEN, EP_INGRESS_TIERED, EP_EGRESS_TIERED = 0x01, 0x02, 0x04, 0x08
EP_INGRESS_AUDIT = 0x10  # ingress has an audit view in pf_audit (0x20: unused, egress is the agent's)


class AuditValue(ctypes.Structure):
    """pf_audit[endpoint_id]: the audit view of an endpoint's ingress."""

    _fields_ = [("policy_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# pf_audit_value.flags (bpf/podfence.h PF_AUDIT_*)
AUDIT_OPEN, AUDIT_TIERED = 0x01, 0x02


class EndpointIpValue(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class IpcacheKey(ctypes.Structure):
    _fields_ = [("generation", ctypes.c_uint32), ("addr", Addr)]


class IpcacheValue(ctypes.Structure):
    _fields_ = [("class_id", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class CidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("generation", ctypes.c_uint32), ("addr", Addr)]


class CidrValue(ctypes.Structure):
    _fields_ = [("class_id", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class PolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("policy_id", ctypes.c_uint32),
        ("peer_class", ctypes.c_uint32),
        ("peer_kind", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("dport_be", ctypes.c_uint16),
    ]


class PolicyValue(ctypes.Structure):
    _fields_ = [("rule_count", ctypes.c_uint32), ("verdict", ctypes.c_uint32)]


# pf_policy_value.verdict (bpf/podfence.h PF_VERDICT_*): per tier the first hit's action and rank
ACT_NONE, ACT_ACCEPT, ACT_DENY, ACT_PASS = 0, 1, 2, 3
VERDICT_SET = 1 << 31
ADMIN_RANK_MAX, REST_RANK_MAX = (1 << 14) - 1, (1 << 13) - 1


def verdict_word(admin: tuple[int, int] | None, rest: tuple[int, int] | None) -> int:
    """The verdict of a cell from its first Admin hit and first other hit, each (rank, action)."""
    word = VERDICT_SET
    if admin is not None:
        rank, action = admin
        if not 0 <= rank <= ADMIN_RANK_MAX:
            raise ValueError(f"more than {ADMIN_RANK_MAX} Admin-tier rules apply to one endpoint direction")
        word |= action | rank << 4
    if rest is not None:
        rank, action = rest
        if not 0 <= rank <= REST_RANK_MAX:
            raise ValueError(f"more than {REST_RANK_MAX} Baseline-tier rules apply to one endpoint direction")
        word |= action << 2 | rank << 18
    return word


class CtKey(ctypes.Structure):
    """A flow's two ends in canonical order: (addr_a, port_a) sorts before (addr_b, port_b)."""

    _fields_ = [
        ("addr_a", Addr),
        ("addr_b", Addr),
        ("port_a_be", ctypes.c_uint16),
        ("port_b_be", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class CtValue(ctypes.Structure):
    _fields_ = [
        ("last_seen_ns", ctypes.c_uint64),
        ("slot", ctypes.c_uint32 * 2),  # per way: endpoint_id + 1 of the sending local pod, 0: none
        ("flags", ctypes.c_uint8 * 2),  # per way: CT_*
        ("closing", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("owner", ctypes.c_uint32),  # endpoint_id + 1 of the pod charged for the entry, 0: nobody
    ]


class CtExpectKey(ctypes.Structure):
    _fields_ = [
        ("saddr", Addr),
        ("sport_be", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("cpu", ctypes.c_uint32),
    ]


class CtExpectValue(ctypes.Structure):
    _fields_ = [
        ("daddr", Addr),  # the destination as the pod sent it (before DNAT)
        ("dport_be", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 6),
        ("seen_ns", ctypes.c_uint64),
        ("conflict_ns", ctypes.c_uint64),
    ]


class FragKey(ctypes.Structure):
    _fields_ = [
        ("saddr", Addr),
        ("daddr", Addr),
        ("id", ctypes.c_uint32),
        ("protocol", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class FragValue(ctypes.Structure):
    _fields_ = [
        ("reason", ctypes.c_uint32),
        ("sport_be", ctypes.c_uint16),
        ("dport_be", ctypes.c_uint16),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class CounterValue(ctypes.Structure):
    _fields_ = [
        ("allowed_packets", ctypes.c_uint64),
        ("allowed_bytes", ctypes.c_uint64),
        ("denied_packets", ctypes.c_uint64),
        ("denied_bytes", ctypes.c_uint64),
    ]


# struct pf_flow_event.verdict and flags (bpf/podfence.h)
FLOW_ALLOWED, FLOW_DENIED, FLOW_AUDIT_DENIED = 0, 1, 2
FLOW_FIRST = 0x02


class FlowEventStruct(ctypes.Structure):
    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("endpoint_id", ctypes.c_uint32),
        ("policy_id", ctypes.c_uint32),
        ("verdict_word", ctypes.c_uint32),
        ("direction", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("sport_be", ctypes.c_uint16),
        ("dport_be", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 6),
        ("saddr", Addr),
        ("daddr", Addr),
    ]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("saddr", Addr),
        ("daddr", Addr),
        ("sport_be", ctypes.c_uint16),
        ("dport_be", ctypes.c_uint16),
        ("protocol", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("endpoint_id", ctypes.c_uint32),
    ]


class FlowPending(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("recorded_ns", ctypes.c_uint64),
        ("policy_id", ctypes.c_uint32),
        ("verdict_word", ctypes.c_uint32),
    ]


class EventBudget(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint64), ("last_refill_ns", ctypes.c_uint64)]


class NfClock(ctypes.Structure):
    _fields_ = [("jiffies", ctypes.c_uint64), ("now_ns", ctypes.c_uint64)]


# map name in the program -> (key mirror, value mirror); the mirror test walks this table.
MAP_MIRRORS: dict[str, tuple[type, type]] = {
    "pf_endpoints": (EndpointKey, EndpointValue),
    "pf_endpoint_ips": (Addr, EndpointIpValue),
    "pf_node_ips": (Addr, IpcacheValue),
    "pf_ipcache": (IpcacheKey, IpcacheValue),
    "pf_cidr": (CidrKey, CidrValue),
    "pf_cidr_host": (IpcacheKey, CidrValue),
    "pf_policy": (PolicyKey, PolicyValue),
    "pf_policy_exact": (PolicyKey, PolicyValue),
    "pf_ct": (CtKey, CtValue),
    "pf_ct_expect": (CtExpectKey, CtExpectValue),
    "pf_frag": (FragKey, FragValue),
    "pf_counters": (ctypes.c_uint32, CounterValue),
    "pf_audit": (ctypes.c_uint32, AuditValue),
    "pf_audit_denied": (ctypes.c_uint32, ctypes.c_uint64),
    "pf_ct_charged": (ctypes.c_uint32, ctypes.c_uint64),
    "pf_ct_released": (ctypes.c_uint32, ctypes.c_uint64),
    "pf_event_budget": (ctypes.c_int, EventBudget),
    "pf_nf_clock": (ctypes.c_int, NfClock),
    "pf_flow_denied": (FlowKey, FlowPending),
}


# mirror -> C struct name in bpf/podfence.h
C_STRUCT_NAMES: dict[type[ctypes.Structure], str] = {
    Addr: "pf_addr",
    EndpointKey: "pf_endpoint_key",
    EndpointValue: "pf_endpoint_value",
    EndpointIpValue: "pf_endpoint_ip_value",
    AuditValue: "pf_audit_value",
    IpcacheKey: "pf_ipcache_key",
    IpcacheValue: "pf_ipcache_value",
    CidrKey: "pf_cidr_key",
    CidrValue: "pf_cidr_value",
    PolicyKey: "pf_policy_key",
    PolicyValue: "pf_policy_value",
    CtKey: "pf_ct_key",
    CtValue: "pf_ct_value",
    CtExpectKey: "pf_ct_expect_key",
    CtExpectValue: "pf_ct_expect_value",
    FragKey: "pf_frag_key",
    FragValue: "pf_frag_value",
    CounterValue: "pf_counter_value",
    FlowEventStruct: "pf_flow_event",
    FlowKey: "pf_flow_key",
    FlowPending: "pf_flow_pending",
    EventBudget: "pf_event_budget",
    NfClock: "pf_nf_clock",
}

# Python constant -> C enumerator/macro of the same value
C_CONSTANTS: dict[str, int] = {
    **{("PF_REASON_ALLOWED" if r is Reason.ALLOWED else f"PF_DROP_{r.name}"): int(r) for r in Reason},
    "PF_REASON_MAX": REASON_MAX,
    "PF_DIR_INGRESS": Direction.INGRESS,
    "PF_DIR_EGRESS": Direction.EGRESS,
    "PF_PEER_IDENTITY": PeerKind.IDENTITY,
    "PF_PEER_CIDR": PeerKind.CIDR,
    "PF_CT_EGRESS_OK": CT_EGRESS_OK,
    "PF_CT_INGRESS_OK": CT_INGRESS_OK,
    "PF_CT_FROM_POD": CT_FROM_POD,
    "PF_WAY_AB": WAY_AB,
    "PF_WAY_BA": WAY_BA,
    "PF_CT_FIN_AB": CT_FIN_AB,
    "PF_CT_FIN_BA": CT_FIN_BA,
    "PF_CT_RST": CT_RST,
    "PF_EP_INGRESS_AUDIT": EP_INGRESS_AUDIT,
    "PF_AUDIT_OPEN": AUDIT_OPEN,
    "PF_AUDIT_TIERED": AUDIT_TIERED,
    "PF_FLOW_ALLOWED": FLOW_ALLOWED,
    "PF_FLOW_DENIED": FLOW_DENIED,
    "PF_FLOW_AUDIT_DENIED": FLOW_AUDIT_DENIED,
    "PF_FLOW_FIRST": FLOW_FIRST,
}


def addr_bytes(address: IPAddress) -> bytes:
    """16-byte datapath form: IPv6 as is, IPv4 v4-mapped."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def address_from_bytes(raw: bytes) -> IPAddress:
    v6 = ipaddress.IPv6Address(bytes(raw))
    return v6.ipv4_mapped if v6.ipv4_mapped is not None else v6


_V4_MAPPED_BYTES = b"\0" * 10 + b"\xff\xff"


def network_prefix(network: IPNetwork) -> tuple[int, bytes]:
    """(prefixlen, 16 bytes) of a network in the datapath's single address space."""
    if isinstance(network, ipaddress.IPv4Network):
        return V4_MAPPED_PREFIX + network.prefixlen, _V4_MAPPED_BYTES + network.network_address.packed
    return network.prefixlen, network.network_address.packed


def network_from_prefix(prefixlen: int, raw: bytes) -> IPNetwork:
    """The network a (prefixlen, 16 bytes) datapath prefix stands for: network_prefix undone."""
    if prefixlen >= V4_MAPPED_PREFIX and raw[:12] == _V4_MAPPED_BYTES:
        return ipaddress.IPv4Network((raw[12:16], prefixlen - V4_MAPPED_PREFIX), strict=False)
    return ipaddress.IPv6Network((raw, prefixlen), strict=False)


def make_addr(raw: bytes) -> Addr:
    addr = Addr()
    ctypes.memmove(addr.bytes, raw, 16)
    return addr
