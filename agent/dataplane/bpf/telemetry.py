"""What the BPF dataplane reports: per-endpoint counters, drop reasons and map usage, read live
from the maps at scrape time (never cached). Flow records: flow_records.py."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.dataplane.base import EndpointCounters
from agent.dataplane.bpf import ctbound
from agent.dataplane.bpf.compiler import EndpointEntry
from agent.dataplane.bpf.loader import BuildKnobs
from agent.dataplane.bpf.maps import Live
from agent.dataplane.bpf.plan import is_exact, is_host
from agent.dataplane.bpf.structs import REASON_MAX, Direction, Reason
from agent.dataplane.flows import FlowRecord


@dataclass(frozen=True)
class DenyEvent:
    endpoint: str  # endpoint key, "" when the interface has no endpoint
    direction: str
    protocol: int
    source: str
    destination: str
    source_port: int
    destination_port: int
    reason: str


def endpoint_counters(module: Any, entries: Iterable[EndpointEntry]) -> list[EndpointCounters]:
    table = module[b"pf_counters"]
    result = []
    for entry in entries:
        for direction in Direction:
            per_cpu = table.getvalue(table.Key(entry.endpoint_id * 2 + direction))
            result.append(
                EndpointCounters(
                    key=entry.endpoint_key,
                    direction=direction.name.lower(),
                    allowed_packets=sum(v.allowed_packets for v in per_cpu),
                    allowed_bytes=sum(v.allowed_bytes for v in per_cpu),
                    denied_packets=sum(v.denied_packets for v in per_cpu),
                    denied_bytes=sum(v.denied_bytes for v in per_cpu),
                )
            )
    return result


def audit_denied(module: Any, entries: Iterable[EndpointEntry]) -> dict[tuple[str, str], int]:
    """pf_audit_denied per endpoint direction (bpf/lib/audit.h), summed over CPUs."""
    table = module[b"pf_audit_denied"]
    counts = {}
    for entry in entries:
        for direction in Direction:
            per_cpu = table.getvalue(table.Key(entry.endpoint_id * 2 + direction))
            counts[(entry.endpoint_key, direction.name.lower())] = int(sum(per_cpu))
    return counts


def drop_reason_counts(module: Any) -> dict[str, int]:
    table = module[b"pf_drop_reasons"]
    counts = {}
    for index in range(1, REASON_MAX):
        try:
            counts[Reason(index).name.lower()] = int(sum(table.getvalue(table.Key(index))))
        except Exception:  # a map pinned by an older version with fewer reasons
            counts[Reason(index).name.lower()] = 0
    return counts


def events_lost(module: Any) -> int:
    table = module[b"pf_events_lost"]
    return int(sum(table.getvalue(table.Key(0))))


def written_map_usage(live: Live, knobs: BuildKnobs) -> dict[str, tuple[int, int]]:
    """(entries, capacity) of each map the agent writes, from its live view."""
    exact = sum(1 for entry in live.policy if is_exact(entry))
    hosts = sum(1 for key in live.cidr if is_host(key))
    return {
        "policy": (len(live.policy) - exact, knobs.policy_max),
        "policy_exact": (exact, knobs.policy_max),
        "ipcache": (len(live.ipcache), knobs.ipcache_max),
        "cidr": (len(live.cidr) - hosts, knobs.cidr_max),
        "cidr_host": (hosts, knobs.cidr_max),
        "endpoints": (len(live.endpoints), knobs.endpoints_max),
        "endpoint_ips": (len(live.endpoint_ips), knobs.endpoints_max * 4),
        "node_ips": (len(live.node_ips), knobs.node_ips_max),
    }


def count_entries(table: Any, chunk: int = 8192) -> int:
    """Entries of a hash map, counted with BPF_MAP_LOOKUP_BATCH (ctbound.lookup_batches): a
    handful of syscalls instead of one get_next_key per entry."""
    return sum(count for _, _, count in ctbound.lookup_batches(table, chunk))


def deny_event(record: FlowRecord) -> DenyEvent:
    """A denied flow record in the older DenyEvent shape (agent.dataplane.base.DenyEventSource)."""
    return DenyEvent(
        endpoint=record.endpoint,
        direction=record.direction,
        protocol=record.protocol,
        source=record.source,
        destination=record.destination,
        source_port=record.source_port,
        destination_port=record.destination_port,
        reason=record.reason,
    )
