"""What each NetworkPolicy costs in the BPF maps, so that the one that does not fit can be
rejected alone (agent/dataplane/fit.py). Pure, and linear in the compiled state's size.

Costs are counted per allow entry without sharing: an entry two policies both produce is
charged to each. That ranks the policies (the largest is rejected first) and estimates what
rejecting one frees; the dataplane compiles again to know for sure.
"""

from __future__ import annotations

from collections import Counter

from agent.dataplane.bpf.compiler import Desired, port_range_prefixes
from agent.dataplane.bpf.structs import POLICY_PREFIX_FULL, POLICY_PREFIX_PROTOCOL
from agent.dataplane.fit import distinct_directions
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
