"""ClusterNetworkPolicy in iptables: a tier's entries as runs of one action, in precedence order.

First match decides within a tier, and entries of equal action decide alike whatever their order,
so a maximal run of consecutive entries (by rank) with one action can be matched as a set: the
compiler writes each run as one hash:net,port set lookup for its single-port entries plus a rule
for each other entry, all with the run's target. A new flow then walks one set lookup per change
of action in the tier's precedence order, not one rule per ClusterNetworkPolicy rule: 1,000 Deny
rules of one port each are one lookup. Entries whose action alternates rank by rank still cost a
lookup per run; the eBPF dataplane has no such term (agent/dataplane/bpf/tiered.py).

Layout of a tiered endpoint chain (compiler._tiered_chains):
    PF-I…/PF-E…:  established, node IPs, v4-mapped as before; Admin runs (Accept -> RETURN,
                  Deny -> DROP, Pass -> goto PF-…n); goto PF-…n
    PF-…n:        isolated: the NetworkPolicy allows -> RETURN; DROP
                  not isolated: Baseline runs (Accept or Pass -> RETURN, Deny -> DROP); RETURN
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.dataplane.types import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    TIER_ADMIN,
    TIER_BASELINE,
    Allow,
    DirectionPolicy,
    Endpoint,
    TieredAllow,
)

if TYPE_CHECKING:
    from agent.dataplane.iptables.compiler import _Compiler


def tier_runs(entries: tuple[TieredAllow, ...], tier: int) -> list[tuple[int, tuple[Allow, ...]]]:
    """`tier`'s entries by rank, cut into maximal runs of one action: (action, matches). A
    Baseline Pass is an Accept (only the default allow follows it)."""
    runs: list[tuple[int, list[Allow]]] = []
    for entry in sorted((e for e in entries if e.tier == tier), key=lambda e: e.rank):
        action = entry.action
        if tier == TIER_BASELINE and action == ACTION_PASS:
            action = ACTION_ACCEPT
        allow = Allow(entry.peer, entry.protocol, entry.port_first, entry.port_last, entry.policy)
        if runs and runs[-1][0] == action:
            runs[-1][1].append(allow)
        else:
            runs.append((action, [allow]))
    return [(action, tuple(allows)) for action, allows in runs]


def tiered_rules(
    compiler: _Compiler,
    endpoint: Endpoint,
    direction: str,
    family: int,
    policy: DirectionPolicy,
    allow: str,
    deny: str,
    run: str = "",
) -> list[str]:
    """The rules after the common head of a direction with tiered entries (see the layout above),
    Accepts ending in `allow` and Denies in `deny`; the chain of the rest is added to the
    compiler's output. `run` sets the grouped sets of an audit view (compiler._audit_chain) apart."""
    # the compiler imports this module: its names are read at call time
    from agent.dataplane.iptables.compiler import CHAIN_PREFIX, INGRESS, _short_hash

    targets = {ACTION_ACCEPT: allow, ACTION_DENY: deny}
    rest: list[str] = []
    if policy.isolated:
        rest += compiler.matching(endpoint, direction, family, policy.allows, allow, f"{run}n")
        rest.append(deny)
    for index, (action, allows) in enumerate(tier_runs(policy.tiered, TIER_BASELINE)):
        rest += compiler.matching(endpoint, direction, family, allows, targets[action], f"{run}b{index}")
    if not policy.isolated:
        rest.append(allow)
    letter = "I" if direction == INGRESS else "E"
    rest_chain = f"{CHAIN_PREFIX}{letter}{_short_hash(endpoint.key)}-{_short_hash(chr(10).join(rest))}n"
    compiler.out.chains[family][rest_chain] = rest
    rules: list[str] = []
    for index, (action, allows) in enumerate(tier_runs(policy.tiered, TIER_ADMIN)):
        target = f"-g {rest_chain}" if action == ACTION_PASS else targets[action]
        rules += compiler.matching(endpoint, direction, family, allows, target, f"{run}a{index}")
    rules.append(f"-g {rest_chain}")
    return rules
