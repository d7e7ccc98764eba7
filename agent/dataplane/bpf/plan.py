"""The writer's plan: the ordered map operations that move the kernel from what it holds to the
desired state. Pure (no I/O), so the claim "every packet is answered as by the old or by the new
state, never by a mix" is checked by replaying plans op by op (tests/unit/test_bpf_plan.py);
dataplane.py executes them (maps.py writes each map op).

Peer maps (ipcache, CIDR LPM) are double-buffered by *generation*: an endpoint's map value names
its policy ids and the generation of peer entries it reads, and one map update flips both. So:
  1. policy LPM entries the new state needs (new ids x new classes) are added beside the old;
  2. if the peer view changed, every peer entry of the new state is written under a fresh
     generation that no endpoint reads yet (order within it is irrelevant); if it did not, the
     current generation is kept and nothing is written;
  3. node addresses and endpoint addresses are added (they only admit);
  4. counter slots of new endpoints are zeroed, the audit views are written (bpf/lib/audit.h;
     read only through an endpoint whose flags name one), then one update per endpoint flips it
     to (new policy ids, new generation): its packets see the old pair or the new pair;
  5. tc filters go on new interfaces (their endpoint entry exists already), off vanished ones;
  6. removals, now unreferenced: endpoints, endpoint and node addresses, peer entries of every
     other generation, policy entries the new state does not use.
That double buffer is the fallback. Given what the live ids stand for, `plan` updates the peer
entries in place through a union view instead (transition.py): policy entries of the union and
of the new state are added, peers move old -> union, endpoints flip (generation unchanged),
peers move union -> new, then the removals; the maps hold |old U new| peer entries at most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dataplane.bpf.compiler import (
    Allocation,
    CidrPrefix,
    Desired,
    EndpointEntry,
    PolicyEntry,
    compile_node_state,
)
from agent.dataplane.bpf.entry_memo import Memos
from agent.dataplane.bpf.structs import HOST_PREFIX, POLICY_PREFIX_FULL
from agent.dataplane.bpf.transition import UnionView, deletion_order, insertion_order, union_view
from agent.dataplane.types import NodeState

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
    @property
    def audit(self) -> Mapping[int, tuple[int, int]]: ...


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


def plan(
    live: MapContents, desired: Desired, previous: Allocation | None = None, memos: Memos | None = None
) -> tuple[list[Op], UnionView | None]:
    """The ops to reach `desired`, in place where `previous` (what the live ids stand for) allows;
    the union view used, if any (its ids must be remembered with the new allocation). `memos`
    keep policy entries between calls (entry_memo.py)."""
    generation = _single_generation(live)
    if previous is not None and generation is not None:
        old_ipcache, old_cidr = peer_view(live, generation)
        union = union_view(live.endpoints, old_ipcache, old_cidr, previous, desired, memos)
        if union is not None:
            return _plan_in_place(live, desired, generation, old_ipcache, old_cidr, union), union
    return _plan_double_buffer(live, desired), None


def compile_and_plan(
    live: MapContents, state: NodeState, previous: Allocation | None, memos: Memos | None = None
) -> tuple[Desired, list[Op], UnionView | None]:
    """Compile `state` and plan it. An allow list that kept its id while its content changed is
    updated in place, which only the union view can do safely (the double buffer would show new
    rules on old peer entries): when the plan falls back, compile again with fresh ids."""
    memo = memos.compile if memos is not None else None
    desired = compile_node_state(state, previous, memo=memo)
    ops, union = plan(live, desired, previous, memos)
    if union is None and previous is not None and _renamed(previous, desired):
        desired = compile_node_state(state, previous, inherit=False, memo=memo)
        ops, union = plan(live, desired, previous, memos)
    return desired, ops, union


def _renamed(previous: Allocation, desired: Desired) -> bool:
    before = {pid: content for content, pid in previous.policies.items()}
    return any(before.get(pid, content) != content for content, pid in desired.allocation.policies.items())


def plan_update(live: MapContents, desired: Desired, previous: Allocation | None = None) -> list[Op]:
    return plan(live, desired, previous)[0]


def _single_generation(live: MapContents) -> int | None:
    """The one generation every endpoint and peer entry is of (0 when there is none); None if several."""
    generations = {e.generation for e in live.endpoints.values()}
    generations |= {gen for gen, _ in live.ipcache} | {gen for gen, _, _ in live.cidr}
    if len(generations) > 1:
        return None
    return generations.pop() if generations else 0


def _plan_in_place(
    live: MapContents,
    desired: Desired,
    generation: int,
    old_ipcache: dict[bytes, int],
    old_cidr: dict[CidrPrefix, int],
    union: UnionView,
) -> list[Op]:
    ops: list[Op] = []
    wanted = {**union.policy, **desired.policy}
    ops += [Op("policy", PUT, entry, n) for entry, n in wanted.items() if entry not in live.policy]
    # peers: old -> union (only additions and class changes; old policy ids read both alike)
    ops += [
        Op("ipcache", PUT, (generation, a), cls)
        for a, cls in union.ipcache.items()
        if old_ipcache.get(a) != cls
    ]
    ops += [
        Op("cidr", PUT, (generation, *prefix), union.cidr[prefix])
        for prefix in insertion_order(union.cidr.keys() - old_cidr.keys())
    ]
    ops += [
        Op("cidr", PUT, (generation, *prefix), union.cidr[prefix])
        for prefix, cls in old_cidr.items()
        if union.cidr[prefix] != cls
    ]
    ops += _endpoint_ops(live, desired, generation, union.interim_ids)
    # vanished endpoints leave now: their policy ids read old peers only until this point
    ops += [
        Op("endpoints", DELETE, ifindex)
        for ifindex in sorted(live.endpoints.keys() - desired.endpoints.keys())
    ]
    # peers: union -> new (new policy ids read both alike)
    ops += [
        Op("ipcache", PUT, (generation, a), cls)
        for a, cls in desired.ipcache.items()
        if union.ipcache[a] != cls
    ]
    ops += [
        Op("ipcache", DELETE, (generation, a)) for a in sorted(union.ipcache.keys() - desired.ipcache.keys())
    ]
    ops += [
        Op("cidr", PUT, (generation, *prefix), cls)
        for prefix, cls in desired.cidr.items()
        if union.cidr[prefix] != cls
    ]
    ops += [
        Op("cidr", DELETE, (generation, *prefix))
        for prefix in deletion_order(union.cidr.keys() - desired.cidr.keys())
    ]
    # endpoints on an interim copy: to the policy id itself, whose entries now read new peers
    for ifindex, compiled in desired.endpoints.items():
        entry = dataclasses.replace(compiled, generation=generation)
        if _interim(live.endpoints.get(ifindex), entry, union.interim_ids) != entry:
            ops.append(Op("endpoints", PUT, ifindex, entry))
    ops += _removals(live, desired, set(), set(), added_policy=union.policy.keys(), endpoints=False)
    return ops


def _plan_double_buffer(live: MapContents, desired: Desired) -> list[Op]:
    generation, write_peers = target_generation(live, desired)
    ops: list[Op] = []
    ops += [Op("policy", PUT, entry, n) for entry, n in desired.policy.items() if entry not in live.policy]
    if write_peers:
        ops += [Op("ipcache", PUT, (generation, a), cls) for a, cls in desired.ipcache.items()]
        ops += [Op("cidr", PUT, (generation, plen, a), cls) for (plen, a), cls in desired.cidr.items()]
    ops += _endpoint_ops(live, desired, generation)
    wanted_ipcache = {(generation, a) for a in desired.ipcache}
    wanted_cidr = {(generation, plen, a) for plen, a in desired.cidr}
    ops += _removals(live, desired, wanted_ipcache, wanted_cidr, peers=True)
    return ops


def _endpoint_ops(
    live: MapContents, desired: Desired, generation: int, interim_ids: Mapping[int, int] | None = None
) -> list[Op]:
    """Steps 3-5: addresses, counters, the endpoint flips, tc filters. An endpoint that joins a
    policy id in `interim_ids` flips to its interim copy (the in-place plan flips it on later)."""
    interim_ids = interim_ids or {}
    ops: list[Op] = []
    ops += [Op("node_ips", PUT, address) for address in sorted(desired.node_ips - set(live.node_ips))]
    ops += [
        Op("endpoint_ips", PUT, address, ifindex)
        for address, ifindex in desired.endpoint_ips.items()
        if live.endpoint_ips.get(address) != ifindex
    ]
    # audit views before the flips that name them (their policy entries are in by now)
    ops += [
        Op("audit", PUT, slot, value)
        for slot, value in sorted(desired.audit.items())
        if live.audit.get(slot) != value
    ]
    for ifindex, compiled in desired.endpoints.items():
        entry = dataclasses.replace(compiled, generation=generation)
        previous = live.endpoints.get(ifindex)
        entry = _interim(previous, entry, interim_ids)
        if previous == entry:
            continue
        if previous is None or previous.endpoint_id != entry.endpoint_id:
            ops.append(Op("counters", PUT, entry.endpoint_id))
        ops.append(Op("endpoints", PUT, ifindex, entry))
    ops += [Op("tc", PUT, ifindex) for ifindex in sorted(desired.interfaces - set(live.interfaces))]
    ops += [Op("tc", DELETE, ifindex) for ifindex in sorted(set(live.interfaces) - desired.interfaces)]
    return ops


def _interim(
    previous: EndpointEntry | None, entry: EndpointEntry, interim_ids: Mapping[int, int]
) -> EndpointEntry:
    ingress, egress = entry.ingress_policy_id, entry.egress_policy_id
    if previous is None or previous.ingress_policy_id != ingress:
        ingress = interim_ids.get(ingress, ingress)
    if previous is None or previous.egress_policy_id != egress:
        egress = interim_ids.get(egress, egress)
    return dataclasses.replace(entry, ingress_policy_id=ingress, egress_policy_id=egress)


def _removals(
    live: MapContents,
    desired: Desired,
    wanted_ipcache: Set[IpcacheKey],
    wanted_cidr: Set[CidrKey],
    peers: bool = False,
    added_policy: Set[PolicyEntry] = frozenset(),
    endpoints: bool = True,
) -> list[Op]:
    """Step 6: what nothing references any more (peer entries only for the double buffer; the
    in-place plan removes its own in order). Policy entries the union added are gone from
    `desired.policy` too, so they go here."""
    removals: list[tuple[str, set[Any]]] = [
        ("endpoints", set(live.endpoints) - set(desired.endpoints) if endpoints else set()),
        ("endpoint_ips", set(live.endpoint_ips) - set(desired.endpoint_ips)),
        ("node_ips", set(live.node_ips) - desired.node_ips),
        # no endpoint's flags name these any more (a delete zeroes the array slot)
        ("audit", set(live.audit) - set(desired.audit)),
    ]
    if peers:
        removals += [("ipcache", set(live.ipcache) - wanted_ipcache), ("cidr", set(live.cidr) - wanted_cidr)]
    removals.append(("policy", (set(live.policy) | added_policy) - desired.policy.keys()))
    ops: list[Op] = []
    for table, keys in removals:
        ops += [Op(table, DELETE, key) for key in sorted(keys)]
    return ops


def peak_sizes(live: MapContents, ops: list[Op]) -> dict[str, int]:
    """Entries each map holds at its fullest while the plan runs (all puts precede all deletes).
    Policy entries of single ports are counted apart (`policy_exact`: the writer keeps them in a
    hash beside the LPM trie), and so are host prefixes (`cidr_host`)."""
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
    sizes["cidr_host"] = sum(1 for key in held["cidr"] if is_host(key))
    sizes["cidr"] -= sizes["cidr_host"]
    return sizes


def is_host(key: CidrKey) -> bool:
    """Is a CIDR entry a host prefix (the writer's pf_cidr_host hash, not the LPM trie)?"""
    return key[1] == HOST_PREFIX


def is_exact(entry: PolicyEntry) -> bool:
    """Does a policy entry name one port of one protocol (the writer's hash, not the LPM trie)?"""
    return entry[0] == POLICY_PREFIX_FULL
