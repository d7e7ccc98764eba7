"""Fitting a NodeState into the BPF maps: compile and plan, and when the plan does not fit,
reject the policies that overflow (agent/dataplane/fit.py) and compile again. Pure (no I/O).

What each NetworkPolicy costs is counted per allow entry without sharing: an entry two policies
both produce is charged to each. That ranks the policies (the largest is rejected first) and
estimates what rejecting one frees; compiling again says for sure. Each round is linear in the
state's size and rejects at least one policy; one round is the rule (the estimate only errs
where rejected policies share entries with kept ones).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from agent.dataplane.base import CapacityError
from agent.dataplane.bpf.compiler import Allocation, Desired, port_range_prefixes
from agent.dataplane.bpf.entry_memo import Memos
from agent.dataplane.bpf.plan import MapContents, Op, compile_and_plan, peak_sizes
from agent.dataplane.bpf.structs import POLICY_PREFIX_FULL, POLICY_PREFIX_PROTOCOL
from agent.dataplane.bpf.transition import UnionView
from agent.dataplane.fit import Overflow, Rejection, choose_rejections, distinct_directions, strip_policies
from agent.dataplane.types import PROTO_ANY, CidrPeer, IdentityPeer, IPNetwork, NodeState

# the maps a policy's allows fill; endpoint and address maps belong to no one policy
ATTRIBUTABLE = ("pf_policy", "pf_policy_exact", "pf_cidr", "pf_cidr_host", "pf_ipcache")
_EXACT_BITS = POLICY_PREFIX_FULL - POLICY_PREFIX_PROTOCOL  # a port prefix of 16 bits: one port


def policy_costs(state: NodeState, desired: Desired) -> dict[str, dict[str, int]]:
    """costs[map][policy]: the entries `policy`'s allows put in `map` (see the module docstring)."""
    allocation = desired.allocation
    identity_classes: Counter[int] = Counter()
    for members in allocation.identity_classes:
        identity_classes.update(members)
    cidr_classes: Counter[CidrPeer] = Counter()
    for peers in allocation.cidr_classes:
        cidr_classes.update(peers)
    costs: dict[str, dict[str, int]] = {name: {} for name in ATTRIBUTABLE}
    policy_map, exact_map = costs["pf_policy"], costs["pf_policy_exact"]
    prefixes: dict[str, set[IPNetwork]] = {}
    identities: dict[str, set[int]] = {}
    for direction in distinct_directions(state):
        if not direction.isolated:
            continue
        for allow in direction.allows:
            peer, name = allow.peer, allow.policy
            if isinstance(peer, IdentityPeer):
                classes = identity_classes[peer.identity]
                identities.setdefault(name, set()).add(peer.identity)
            else:
                classes = cidr_classes[peer]
                prefixes.setdefault(name, set()).update((peer.cidr, *peer.excepts))
            if not classes:
                continue
            if allow.protocol == PROTO_ANY:
                policy_map[name] = policy_map.get(name, 0) + classes
                continue
            blocks = port_range_prefixes(allow.port_first, allow.port_last)
            exact = sum(1 for _value, bits in blocks if bits == _EXACT_BITS)
            if exact:
                exact_map[name] = exact_map.get(name, 0) + exact * classes
            if len(blocks) > exact:
                policy_map[name] = policy_map.get(name, 0) + (len(blocks) - exact) * classes
    for name, networks in prefixes.items():
        hosts = sum(1 for network in networks if network.prefixlen == network.max_prefixlen)
        costs["pf_cidr_host"][name] = hosts
        costs["pf_cidr"][name] = len(networks) - hosts
    for name, referenced in identities.items():
        costs["pf_ipcache"][name] = sum(len(state.identities.get(identity, ())) for identity in referenced)
    return costs


def overflows(
    live: MapContents, desired: Desired, ops: list[Op], rooms: Mapping[str, int]
) -> list[Overflow]:
    """The maps (named as pinned, "pf_policy") that `ops` would fill past `rooms` at their peak."""
    checks = [(f"pf_{table}", size) for table, size in peak_sizes(live, ops).items()]
    slots = desired.allocation.endpoint_slots.values()
    if slots:
        checks.append(("pf_counters", (max(slots) + 1) * 2))
    return [Overflow(name, needed, rooms[name]) for name, needed in checks if needed > rooms[name]]


def fit_and_plan(
    live: MapContents,
    state: NodeState,
    previous: Allocation | None,
    rooms: Mapping[str, int],
    memos: Memos | None = None,
) -> tuple[Desired, list[Op], UnionView | None, dict[str, Rejection]]:
    """Compile and plan `state` (plan.compile_and_plan), rejecting whole policies, the largest
    in the overflowing map first, until the plan fits `rooms`; the rejections by policy.
    Raises CapacityError when what overflows belongs to no policy (endpoints, addresses) or
    nothing is left to reject; ValueError when the state does not compile."""
    rejected: dict[str, Rejection] = {}
    fitted = state
    while True:
        desired, ops, union = compile_and_plan(live, fitted, previous, memos)
        over = overflows(live, desired, ops, rooms)
        if not over:
            return desired, ops, union, rejected
        # endpoint and address maps are no policy's doing: rejecting one cannot help them
        unattributable = [o for o in over if o.table not in ATTRIBUTABLE]
        more = [] if unattributable else choose_rejections(over, policy_costs(fitted, desired), rejected)
        if not more:
            first = (unattributable or over)[0]
            raise CapacityError(
                f"BPF map {first.table} would need {first.needed} entries during this update but holds "
                f"{first.room}; nothing was changed (raise the map size)"
                + (f"; rejected before that: {', '.join(sorted(rejected))}" if rejected else "")
            )
        rejected.update((r.policy, r) for r in more)
        fitted = strip_policies(state, rejected.keys())
