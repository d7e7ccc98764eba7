"""The writer's plan: the ordered map operations that move the kernel from what it holds to the
desired state. Pure (no I/O), so the claim "every packet is answered as by the old or by the new
state, never by a mix" is checked by replaying plans op by op (tests/unit/test_bpf_plan.py);
dataplane.py executes them.

Peer maps (ipcache, CIDR LPM) are double-buffered by *generation*: an endpoint's map value names
its policy ids and the generation of peer entries it reads, and one map update flips both. So:
  1. policy LPM entries the new state needs (new ids x new classes) are added beside the old;
  2. if the peer view changed, every peer entry of the new state is written under a fresh
     generation that no endpoint reads yet (order within it is irrelevant); if it did not, the
     current generation is kept and nothing is written;
  3. node addresses and endpoint addresses are added (they only admit);
  4. counter slots of new endpoints are zeroed, then one update per endpoint flips it to
     (new policy ids, new generation): its packets see the old pair or the new pair;
  5. tc filters go on new interfaces (their endpoint entry exists already), off vanished ones;
  6. removals, now unreferenced: endpoints, endpoint and node addresses, peer entries of every
     other generation, policy entries the new state does not use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dataplane.bpf.compiler import CidrPrefix, Desired, EndpointEntry, PolicyEntry
from agent.dataplane.bpf.structs import POLICY_PREFIX_FULL

PUT, DELETE = "put", "delete"
IpcacheKey = tuple[int, bytes]  # (generation, address)
CidrKey = tuple[int, int, bytes]  # (generation, prefixlen in the 128-bit space, address)


class MapContents(Protocol):
    """What the maps hold (the writer's live view, or a test's model)."""

    @property
    def endpoints(self) -> Mapping[int, EndpointEntry]: ...
    @property
    def endpoint_ips(self) -> Mapping[bytes, int]: ...
    @property
    def node_ips(self) -> Set[bytes]: ...
    @property
    def ipcache(self) -> Mapping[IpcacheKey, int]: ...
    @property
    def cidr(self) -> Mapping[CidrKey, int]: ...
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


def peer_view(live: MapContents, generation: int) -> tuple[dict[bytes, int], dict[CidrPrefix, int]]:
    """The ipcache and CIDR contents of one generation, in the compiler's (generation-free) form."""
    ipcache = {address: cls for (gen, address), cls in live.ipcache.items() if gen == generation}
    cidr = {(plen, address): cls for (gen, plen, address), cls in live.cidr.items() if gen == generation}
    return ipcache, cidr


def target_generation(live: MapContents, desired: Desired) -> tuple[int, bool]:
    """(generation the endpoints will read, whether its peer entries must be written)."""
    in_use = {entry.generation for entry in live.endpoints.values()}
    if len(in_use) == 1:
        current = in_use.pop()
        if peer_view(live, current) == (desired.ipcache, desired.cidr):
            return current, False
    elif not in_use and not live.ipcache and not live.cidr and not desired.ipcache and not desired.cidr:
        return 0, False
    existing = in_use | {gen for gen, _ in live.ipcache} | {gen for gen, _, _ in live.cidr}
    return (max(existing) + 1 if existing else 0), True


def plan_update(live: MapContents, desired: Desired) -> list[Op]:
    generation, write_peers = target_generation(live, desired)
    ops: list[Op] = []
    ops += [Op("policy", PUT, entry, n) for entry, n in desired.policy.items() if entry not in live.policy]
    if write_peers:
        ops += [Op("ipcache", PUT, (generation, a), cls) for a, cls in desired.ipcache.items()]
        ops += [Op("cidr", PUT, (generation, plen, a), cls) for (plen, a), cls in desired.cidr.items()]
    ops += [Op("node_ips", PUT, address) for address in sorted(desired.node_ips - set(live.node_ips))]
    ops += [
        Op("endpoint_ips", PUT, address, ifindex)
        for address, ifindex in desired.endpoint_ips.items()
        if live.endpoint_ips.get(address) != ifindex
    ]
    for ifindex, compiled in desired.endpoints.items():
        entry = dataclasses.replace(compiled, generation=generation)
        previous = live.endpoints.get(ifindex)
        if previous == entry:
            continue
        if previous is None or previous.endpoint_id != entry.endpoint_id:
            ops.append(Op("counters", PUT, entry.endpoint_id))
        ops.append(Op("endpoints", PUT, ifindex, entry))
    ops += [Op("tc", PUT, ifindex) for ifindex in sorted(desired.interfaces - set(live.interfaces))]
    ops += [Op("tc", DELETE, ifindex) for ifindex in sorted(set(live.interfaces) - desired.interfaces)]
    wanted_ipcache = {(generation, a) for a in desired.ipcache}
    wanted_cidr = {(generation, plen, a) for plen, a in desired.cidr}
    removals: list[tuple[str, set[Any]]] = [
        ("endpoints", set(live.endpoints) - set(desired.endpoints)),
        ("endpoint_ips", set(live.endpoint_ips) - set(desired.endpoint_ips)),
        ("node_ips", set(live.node_ips) - desired.node_ips),
        ("ipcache", set(live.ipcache) - wanted_ipcache),
        ("cidr", set(live.cidr) - wanted_cidr),
        ("policy", set(live.policy) - set(desired.policy)),
    ]
    for table, keys in removals:
        ops += [Op(table, DELETE, key) for key in sorted(keys)]
    return ops


def peak_sizes(live: MapContents, ops: list[Op]) -> dict[str, int]:
    """Entries each map holds at its fullest while the plan runs (all puts precede all deletes).
    Policy entries of single ports are counted apart (`policy_exact`: the writer keeps them in a
    hash beside the LPM trie)."""
    held: dict[str, set[Any]] = {
        "policy": set(live.policy),
        "ipcache": set(live.ipcache),
        "cidr": set(live.cidr),
        "endpoints": set(live.endpoints),
        "endpoint_ips": set(live.endpoint_ips),
        "node_ips": set(live.node_ips),
    }
    for op in ops:
        if op.action == PUT and op.table in held:
            held[op.table].add(op.key)
    sizes = {table: len(keys) for table, keys in held.items()}
    sizes["policy_exact"] = sum(1 for entry in held["policy"] if is_exact(entry))
    sizes["policy"] -= sizes["policy_exact"]
    return sizes


def is_exact(entry: PolicyEntry) -> bool:
    """Does a policy entry name one port of one protocol (the writer's hash, not the LPM trie)?"""
    return entry[0] == POLICY_PREFIX_FULL
