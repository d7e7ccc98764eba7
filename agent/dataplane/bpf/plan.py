"""The writer's plan: the ordered map operations that move the kernel from what it holds to the
desired state. Pure (no I/O), so the ordering that keeps every packet's verdict at "old or new"
can be checked by replaying the plan (tests/unit/test_bpf_plan.py); dataplane.py executes it.

Order (Felix's dependency order: add peers and policies, flip endpoints, remove old):
  1. policy LPM entries of the transition superset (old and new ids x old and new classes);
  2. ipcache upserts; CIDR prefixes upserted longest first (a new prefix never shadows a more
     specific new one that is not written yet); node addresses;
  3. endpoint addresses (anti-spoofing admits them), counter slots of new endpoints zeroed, then
     one update per endpoint flips it to its new policy ids;
  4. tc filters on new interfaces (their endpoint entry exists already), off vanished ones;
  5. removals: endpoints, endpoint addresses, node addresses, ipcache entries, CIDR prefixes
     shortest first (a deleted prefix never uncovers an old, less specific one), and last the
     policy entries the new state does not use.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dataplane.bpf.compiler import CidrPrefix, Desired, EndpointEntry, PolicyEntry

PUT, DELETE = "put", "delete"


class MapContents(Protocol):
    """What the maps hold (the writer's live view, or a test's model)."""

    @property
    def endpoints(self) -> Mapping[int, EndpointEntry]: ...
    @property
    def endpoint_ips(self) -> Mapping[bytes, int]: ...
    @property
    def node_ips(self) -> Set[bytes]: ...
    @property
    def ipcache(self) -> Mapping[bytes, int]: ...
    @property
    def cidr(self) -> Mapping[CidrPrefix, int]: ...
    @property
    def policy(self) -> Set[PolicyEntry]: ...
    @property
    def interfaces(self) -> Set[int]: ...


@dataclass(frozen=True)
class Op:
    table: str  # policy | ipcache | cidr | node_ips | endpoint_ips | counters | endpoints | tc
    action: str  # PUT | DELETE
    key: Any
    value: Any = None


def plan_update(live: MapContents, desired: Desired, transition: Mapping[PolicyEntry, int]) -> list[Op]:
    ops: list[Op] = []
    ops += [Op("policy", PUT, entry, n) for entry, n in transition.items() if entry not in live.policy]
    ops += [
        Op("ipcache", PUT, address, class_id)
        for address, class_id in desired.ipcache.items()
        if live.ipcache.get(address) != class_id
    ]
    ops += [
        Op("cidr", PUT, prefix, desired.cidr[prefix])
        for prefix in sorted(desired.cidr, reverse=True)
        if live.cidr.get(prefix) != desired.cidr[prefix]
    ]
    ops += [Op("node_ips", PUT, address) for address in sorted(desired.node_ips - set(live.node_ips))]
    ops += [
        Op("endpoint_ips", PUT, address, ifindex)
        for address, ifindex in desired.endpoint_ips.items()
        if live.endpoint_ips.get(address) != ifindex
    ]
    for ifindex, entry in desired.endpoints.items():
        previous = live.endpoints.get(ifindex)
        if previous == entry:
            continue
        if previous is None or previous.endpoint_id != entry.endpoint_id:
            ops.append(Op("counters", PUT, entry.endpoint_id))
        ops.append(Op("endpoints", PUT, ifindex, entry))
    ops += [Op("tc", PUT, ifindex) for ifindex in sorted(desired.interfaces - set(live.interfaces))]
    ops += [Op("tc", DELETE, ifindex) for ifindex in sorted(set(live.interfaces) - desired.interfaces)]
    removals: list[tuple[str, set[Any]]] = [
        ("endpoints", set(live.endpoints) - set(desired.endpoints)),
        ("endpoint_ips", set(live.endpoint_ips) - set(desired.endpoint_ips)),
        ("node_ips", set(live.node_ips) - desired.node_ips),
        ("ipcache", set(live.ipcache) - set(desired.ipcache)),
        ("cidr", set(live.cidr) - set(desired.cidr)),  # sorted: shortest prefix first
        ("policy", set(live.policy) - set(desired.policy)),
    ]
    for table, keys in removals:
        ops += [Op(table, DELETE, key) for key in sorted(keys)]
    return ops
