"""The pinned maps as the writer sees them: the live view, one writer per plan table, reading
the maps back on start, and the byte-level keys of each map.

plan.py says what to put and delete (pure); this module does it, one op at a time, and keeps
`Live` equal to what the kernel holds after each op that succeeded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane.base import PermanentDataplaneError
from agent.dataplane.bpf import ctbound
from agent.dataplane.bpf.compiler import Allocation, EndpointEntry, PolicyEntry
from agent.dataplane.bpf.plan import PUT, CidrKey, IpcacheKey, Op, is_exact, is_host
from agent.dataplane.bpf.structs import (
    GENERATION_PREFIX,
    HOST_PREFIX,
    POLICY_PREFIX_FULL,
    Direction,
    make_addr,
)
from agent.dataplane.bpf.tiered import split_leaf_value

log = logging.getLogger(__name__)


@dataclass
class Live:
    """What this process believes the kernel holds (read back from the maps on start)."""

    endpoints: dict[int, EndpointEntry] = field(default_factory=dict)
    endpoint_ips: dict[bytes, int] = field(default_factory=dict)
    node_ips: set[bytes] = field(default_factory=set)
    ipcache: dict[IpcacheKey, int] = field(default_factory=dict)
    cidr: dict[CidrKey, int] = field(default_factory=dict)
    policy: set[PolicyEntry] = field(default_factory=set)
    interfaces: set[int] = field(default_factory=set)
    allocation: Allocation | None = None
    audit: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (policy id, flags)


# ---- writing -----------------------------------------------------------------------------------


def write(module: Any, live: Live, op: Op) -> None:
    """Execute one map op of the plan (every table but "tc", which the dataplane attaches)."""
    writer = WRITERS.get(op.table)
    if writer is None:  # pragma: no cover - plan.py and this table are written together
        raise PermanentDataplaneError(f"unknown plan operation {op}")
    writer(module, live, op)


# One writer per plan table: it puts or deletes one entry, and updates `live` only once the
# kernel took the change.


def _keyed(table: Any, key: Any, op: Op, held: dict[Any, int]) -> None:
    """An entry whose value is op.value (a class or an ifindex), held in `held` by op.key."""
    if op.action == PUT:
        table[key] = table.Leaf(op.value, 0)
        held[op.key] = op.value
    else:
        delete(table, key)
        held.pop(op.key, None)


def _member(table: Any, key: Any, value: int, op: Op, held: set[Any], second: int = 0) -> None:
    """An entry whose op.key is all `held` remembers (its value follows from the key)."""
    if op.action == PUT:
        table[key] = table.Leaf(value, second)
        held.add(op.key)
    else:
        delete(table, key)
        held.discard(op.key)


def _write_policy(module: Any, live: Live, op: Op) -> None:
    table = module[b"pf_policy_exact" if is_exact(op.key) else b"pf_policy"]
    # op.value: the rule count and the verdict word (tiered.leaf_value); a put's value follows
    # from its key, as a tiered policy's content never changes in place (compiler.py)
    rule_count, verdict = split_leaf_value(op.value) if op.action == PUT else (0, 0)
    _member(table, policy_key(table, op.key), rule_count, op, live.policy, verdict)


def _write_ipcache(module: Any, live: Live, op: Op) -> None:
    table = module[b"pf_ipcache"]
    key = table.Key()
    key.generation = op.key[0]
    ctypes.memmove(key.addr.bytes, op.key[1], 16)
    _keyed(table, key, op, live.ipcache)


def _write_endpoint_ip(module: Any, live: Live, op: Op) -> None:
    _keyed(module[b"pf_endpoint_ips"], make_addr(op.key), op, live.endpoint_ips)


def _write_cidr(module: Any, live: Live, op: Op) -> None:
    if is_host(op.key):
        table = module[b"pf_cidr_host"]
        key = cidr_host_key(table, op.key)
    else:
        table = module[b"pf_cidr"]
        key = cidr_key(table, op.key)
    _keyed(table, key, op, live.cidr)


def _write_node_ip(module: Any, live: Live, op: Op) -> None:
    _member(module[b"pf_node_ips"], make_addr(op.key), 1, op, live.node_ips)


def _write_counters(module: Any, _live: Live, op: Op) -> None:
    """A reused slot must not inherit the previous endpoint's numbers: zeroed, whatever the action."""
    counters = module[b"pf_counters"]
    for direction in Direction:
        per_cpu = counters.Leaf(*[counters.sLeaf() for _ in range(counters.total_cpu)])
        counters[counters.Key(op.key * 2 + direction)] = per_cpu
    audit_denied = module[b"pf_audit_denied"]
    for direction in Direction:
        audit_denied[audit_denied.Key(op.key * 2 + direction)] = audit_denied.Leaf(
            *[0] * audit_denied.total_cpu
        )
    ctbound.zero(module, op.key)  # nor its conntrack charge


def _write_audit(module: Any, live: Live, op: Op) -> None:
    """pf_audit is an array: a delete writes the slot's zero value (no audit view)."""
    table = module[b"pf_audit"]
    policy_id, flags = op.value if op.action == PUT else (0, 0)
    table[table.Key(op.key)] = table.Leaf(policy_id, flags)
    if op.action == PUT:
        live.audit[op.key] = op.value
    else:
        live.audit.pop(op.key, None)


def _write_endpoint(module: Any, live: Live, op: Op) -> None:
    table = module[b"pf_endpoints"]
    if op.action == PUT:
        entry: EndpointEntry = op.value
        leaf = table.Leaf(
            entry.endpoint_id, entry.ingress_policy_id, entry.egress_policy_id, entry.generation
        )
        ctypes.memmove(leaf.mac, entry.mac, 6)
        leaf.flags = entry.flags
        table[table.Key(op.key)] = leaf
        live.endpoints[op.key] = entry
    else:
        delete(table, table.Key(op.key))
        live.endpoints.pop(op.key, None)


# plan.Op.table -> its writer ("tc" is the dataplane's: it attaches programs, no map)
WRITERS: dict[str, Callable[[Any, Live, Op], None]] = {
    "policy": _write_policy,
    "ipcache": _write_ipcache,
    "endpoint_ips": _write_endpoint_ip,
    "cidr": _write_cidr,
    "node_ips": _write_node_ip,
    "counters": _write_counters,
    "endpoints": _write_endpoint,
    "audit": _write_audit,
}


# ---- reading back ------------------------------------------------------------------------------


def read_live(module: Any, saved: dict[str, Any]) -> tuple[Live, dict[str, Any]]:
    """What a previous run left in the pinned maps, so the next apply is a diff. `saved` is the
    state file's content; returns the live view (allocation not yet set) and the part of `saved`
    that still describes these maps ({} when the pins are fresh)."""
    live = Live()
    slot_of_key: dict[int, str] = {v: k for k, v in saved.get("endpoint_slots", {}).items()}
    for key, value in module[b"pf_endpoints"].items():
        endpoint_key = slot_of_key.get(value.endpoint_id, f"adopted/{key.ifindex}")
        live.endpoints[key.ifindex] = EndpointEntry(
            endpoint_key,
            value.endpoint_id,
            value.ingress_policy_id,
            value.egress_policy_id,
            value.generation,
            bytes(value.mac),
        )
    for key, value in module[b"pf_endpoint_ips"].items():
        live.endpoint_ips[bytes(key.bytes)] = value.ifindex
    live.audit = {
        int(k.value): (v.policy_id, v.flags) for k, v in module[b"pf_audit"].items() if v.policy_id or v.flags
    }
    live.node_ips = {bytes(key.bytes) for key in module[b"pf_node_ips"]}
    live.ipcache = {(k.generation, bytes(k.addr.bytes)): v.class_id for k, v in module[b"pf_ipcache"].items()}
    live.cidr = {
        (k.generation, k.prefixlen - GENERATION_PREFIX, bytes(k.addr.bytes)): v.class_id
        for k, v in module[b"pf_cidr"].items()
    }
    for k, v in module[b"pf_cidr_host"].items():
        live.cidr[(k.generation, HOST_PREFIX, bytes(k.addr.bytes))] = v.class_id
    live.policy = {
        (k.prefixlen, k.policy_id, k.peer_class, k.peer_kind, k.protocol, ntohs(k.dport_be))
        for name in (b"pf_policy", b"pf_policy_exact")
        for k in module[name]
    }
    if not (live.endpoints or live.endpoint_ips or live.policy or live.ipcache or live.cidr):
        # Fresh pins (bpffs was emptied, e.g. reboot or an uninstall that kept /run): the state
        # file describes a kernel that no longer exists, and its ifindexes may now name other
        # interfaces. Start clean.
        saved = {}
    return live, saved


def unknown_meaning_allocation(live: Live) -> Allocation:
    """No record of what the ids mean: hand out ids above everything in use (endpoints'
    policy ids too: an isolated endpoint without allows has no policy entry) so new
    entries never give a live id a different meaning before the flips."""
    highest = max(
        [e[1] for e in live.policy]
        + [e[2] for e in live.policy]
        + list(live.ipcache.values())
        + list(live.cidr.values())
        + [e.ingress_policy_id for e in live.endpoints.values()]
        + [e.egress_policy_id for e in live.endpoints.values()]
        + [policy_id for policy_id, _ in live.audit.values()]
        + [0]
    )
    return Allocation(next_id=highest + 1)


def move_exact_policy_entries(module: Any) -> None:
    """A version before pf_policy_exact kept single-port entries in the LPM trie: copy each
    into the hash, then delete it from the trie, so the writer finds every entry where it
    looks (a stale copy would keep allowing after its rule is gone). The allow is in one map
    or both at every moment; this runs once the programs, which read both, are in place."""
    trie, exact = module[b"pf_policy"], module[b"pf_policy_exact"]
    # the trie's own keys: a lookup there would answer with the longest match, maybe another
    stranded = [(key, trie[key]) for key in list(trie.keys()) if key.prefixlen == POLICY_PREFIX_FULL]
    for key, value in stranded:
        entry = (
            key.prefixlen,
            key.policy_id,
            key.peer_class,
            key.peer_kind,
            key.protocol,
            ntohs(key.dport_be),
        )
        exact[policy_key(exact, entry)] = exact.Leaf(value.rule_count, 0)
        delete(trie, key)
    if stranded:
        log.info("moved %d single-port policy entries from the LPM trie to pf_policy_exact", len(stranded))


def move_host_prefixes(module: Any) -> None:
    """A version before pf_cidr_host kept host prefixes in the LPM trie: copy each into the
    hash, then delete it from the trie (the programs, in place by now, read the hash first
    and find the same class in either), so the writer finds every entry where it looks."""
    trie, host = module[b"pf_cidr"], module[b"pf_cidr_host"]
    stranded = [(key, trie[key]) for key in list(trie.keys())
                if key.prefixlen == GENERATION_PREFIX + HOST_PREFIX]  # fmt: skip
    for key, value in stranded:
        key_tuple = (key.generation, HOST_PREFIX, bytes(key.addr.bytes))
        host[cidr_host_key(host, key_tuple)] = host.Leaf(value.class_id, 0)
        delete(trie, key)
    if stranded:
        log.info("moved %d host prefixes from the CIDR LPM trie to pf_cidr_host", len(stranded))


# ---- keys --------------------------------------------------------------------------------------


def ntohs(value: int) -> int:
    return int.from_bytes(int(value).to_bytes(2, "little"), "big")


def htons(value: int) -> int:
    return ntohs(value)


def policy_key(table: Any, entry: PolicyEntry) -> Any:
    prefixlen, policy_id, peer_class, peer_kind, protocol, port = entry
    return table.Key(prefixlen, policy_id, peer_class, peer_kind, protocol, htons(port))


def cidr_key(table: Any, key_tuple: CidrKey) -> Any:
    generation, prefixlen, address = key_tuple
    key = table.Key()
    key.prefixlen = GENERATION_PREFIX + prefixlen
    key.generation = generation
    ctypes.memmove(key.addr.bytes, address, 16)
    return key


def cidr_host_key(table: Any, key_tuple: CidrKey) -> Any:
    generation, _prefixlen, address = key_tuple
    key = table.Key()
    key.generation = generation
    ctypes.memmove(key.addr.bytes, address, 16)
    return key


def delete(table: Any, key: Any) -> None:
    with contextlib.suppress(KeyError):
        del table[key]
