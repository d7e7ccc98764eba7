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

from agent.dataplane.iptables.flowrecords import NO_POLICY, NO_RULE, RuleName, allow_of
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
        allow = allow_of(entry)
        if runs and runs[-1][0] == action:
            runs[-1][1].append(allow)
        else:
            runs.append((action, [allow]))
    return [(action, tuple(allows)) for action, allows in runs]


def tiered_rules(
    compiler: _Compiler, endpoint: Endpoint, direction: str, family: int, policy: DirectionPolicy
) -> list[str]:
    """The rules after the common head of a direction with tiered entries (see the layout above);
    the chain of the rest is added to the compiler's output."""
    # the compiler imports this module: its names are read at call time
    from agent.dataplane.iptables.compiler import CHAIN_PREFIX, INGRESS, _short_hash

    rest: list[str] = []
    if policy.isolated:
        rest += compiler.matching(endpoint, direction, family, policy.allows, ACTION_ACCEPT, "n")
        rest.append(compiler.decided(family, ACTION_DENY, RuleName(direction, "networkpolicy", "", NO_RULE)))
    for index, (action, allows) in enumerate(tier_runs(policy.tiered, TIER_BASELINE)):
        rest += compiler.matching(endpoint, direction, family, allows, action, f"b{index}", TIER_BASELINE)
    if not policy.isolated:
        rest.append(compiler.decided(family, ACTION_ACCEPT, RuleName(direction, "default", "", NO_POLICY)))
    letter = "I" if direction == INGRESS else "E"
    rest_chain = f"{CHAIN_PREFIX}{letter}{_short_hash(endpoint.key)}-{_short_hash(chr(10).join(rest))}n"
    compiler.out.chains[family][rest_chain] = rest
    rules: list[str] = []
    for index, (action, allows) in enumerate(tier_runs(policy.tiered, TIER_ADMIN)):
        target: str | int = f"-g {rest_chain}" if action == ACTION_PASS else action
        rules += compiler.matching(endpoint, direction, family, allows, target, f"a{index}", TIER_ADMIN)
    rules.append(f"-g {rest_chain}")
    return rules
