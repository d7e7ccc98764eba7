"""Flow records: what a dataplane reports about each new flow (issue 24).

One record per flow, not per packet: the first packet of an allowed flow, the first denied
packet of a denied flow (later denied packets of the same flow are aggregated into `packets`
and `bytes` of a later record, never one record each), and a verdict change. The dataplane
fills the tuple and the verdict, names the deciding `tier`, `policy` and `rule` from the
Allow/TieredAllow it was given (their `policy` and `rule`), and interns (tier, policy, rule)
into `rule_ref` itself; the node layer passes records on as they are.

This is the contract between the dataplanes (producers), the node's flow buffer and the
control service's relay (consumers): add fields at the end, with defaults, never rename.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable


class FlowVerdict(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    # Allowed by the enforced policies, but an audit-mode policy would deny it.
    AUDIT_DENIED = "audit-denied"


@dataclass(frozen=True)
class FlowRecord:
    time_ns: int  # wall clock (time.time_ns()) when the dataplane saw the flow's packet
    endpoint: str  # "namespace/name" of the pod this verdict is for; "" when none claims it
    direction: str  # "ingress" (to the pod) | "egress" (from the pod)
    protocol: int  # IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP)
    source: str
    destination: str
    source_port: int  # ICMP: type
    destination_port: int  # ICMP: code
    verdict: FlowVerdict
    # Drop reason name as in podfence_drops_total{reason} ("policy", "spoofed_source", ...);
    # "" for an allowed flow.
    reason: str = ""
    # Opaque reference to the compiled entry that decided (0: none, e.g. no policy selects the
    # pod, or isolated and no rule matched): the dataplane's interned (tier, policy, rule).
    rule_ref: int = 0
    # Filled in by the dataplane from the Allow/TieredAllow that decided:
    tier: str = ""  # "admin" | "networkpolicy" | "baseline" | "default" ("" unknown)
    policy: str = ""  # "namespace/name" (NetworkPolicy) or "name" (ClusterNetworkPolicy)
    rule: str = ""  # e.g. "ingress[0]", or why no rule decided: "no policy selects the pod"
    # Packets and bytes of this flow the record stands for (denied packets are aggregated).
    packets: int = 1
    bytes: int = 0


@runtime_checkable
class FlowRecordSource(Protocol):
    """A dataplane that reports flow records."""

    def poll_flows(self, timeout_ms: int) -> Iterable[FlowRecord]:
        """Records produced since the last call; waits at most timeout_ms for the first."""

    def flows_lost(self) -> int:
        """Records the dataplane could not deliver (budget exhausted, ring buffer full)."""
