"""ClusterNetworkPolicy in iptables: each tier as one set per action, or as runs of one action.

A tier whose entries are all single-port TCP/UDP/SCTP (the usual admin guardrail: a port, from
or to some peers) has its precedence resolved at compile time into disjoint hash:net,port sets,
one per action (tier_sets.py): a new flow costs one set lookup per action, at most three, the
same for 10 rules as for 1,000 however their actions alternate, as the eBPF dataplane's verdict
words (agent/dataplane/bpf/tiered.py). The sets are named after the endpoint, direction, tier
and action, so a change of rules or identity members is a set swap.

A tier holding another entry (a port range, every port, another protocol) is written as runs:
first match decides within a tier and entries of equal action decide alike whatever their
order, so each maximal run of consecutive entries (by rank) of one action is one hash:net,port
lookup for its single-port entries plus a rule for each other entry, all with the run's target.
Such a tier costs one lookup per change of action in its precedence order.

With flow records on, a set's match logs through one chain per (direction, tier, action) whose
rule is SET_RULE: a member of the Deny set may come from any Deny rule, so the reader
(flowsource.py) names the deciding rule from the packet's peer and port, by the same first
entry by rank the sets were resolved with. A run's rule logs its own name.

Layout of a tiered endpoint chain (tiered_rules):
    PF-I…/PF-E…:  established, node IPs, v4-mapped as before; Admin sets or runs (Accept ->
                  RETURN, Deny -> DROP, Pass -> goto PF-…n); goto PF-…n
    PF-…n:        isolated: the NetworkPolicy allows -> RETURN; DROP
                  not isolated: Baseline sets or runs (Accept or Pass -> RETURN, Deny -> DROP);
                  RETURN
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.dataplane.iptables.flowrecords import SET_RULE, TIER_NAMES, RuleName, allow_of
from agent.dataplane.iptables.layout import INGRESS, SET_PREFIX, endpoint_chain_name, short_hash
from agent.dataplane.iptables.tier_sets import resolve_tier
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


_ACTION_LETTERS = {ACTION_ACCEPT: "a", ACTION_DENY: "d", ACTION_PASS: "p"}


def _tier_rules(
    compiler: _Compiler,
    endpoint: Endpoint,
    direction: str,
    family: int,
    policy: DirectionPolicy,
    tier: int,
    pass_target: str | None,
) -> list[str]:
    """The rules judging `tier`: one per action set (tier_sets.py), then the runs of the entries
    no set holds; all of them as runs if a set would outgrow the set limit. Accept and Deny
    decide (Targets.decided); Pass goes to `pass_target`, or (None: the Baseline tier, where
    only the default allow follows) decides as an Accept."""
    entries = [e for e in policy.tiered if e.tier == tier]
    letter = "a" if tier == TIER_ADMIN else "b"
    rules = []
    runs: tuple[TieredAllow, ...] = tuple(entries)
    resolved = resolve_tier(entries, family, compiler.state.identities)
    if all(len(m) <= compiler.set_limit for m in resolved.members.values()):
        side = "src" if direction == INGRESS else "dst"
        runs = resolved.wide
        for action in sorted(resolved.members):
            audit = "u" if compiler.targets.auditing is not None else ""  # an audit view's sets are its own
            name = (
                f"{SET_PREFIX}t{family}{direction[0]}{letter}{_ACTION_LETTERS[action]}{audit}-"
                f"{short_hash(endpoint.key, 12)}"
            )
            compiler._add_set(name, family, "hash:net,port", resolved.members[action])
            compiler.out.set_users.setdefault(name, set()).update(resolved.policies.get(action, set()))
            # the sets are disjoint: their order does not matter
            # decided(): in an audit chain a Deny is a counted RETURN and an Accept the enforced
            # allow's target; with an audit view an Accept goes on to it (targets.py)
            decided = RuleName(direction, TIER_NAMES[tier], "", SET_RULE)
            if action == ACTION_PASS and pass_target is not None:
                target = pass_target
            else:
                accepts = ACTION_ACCEPT if action == ACTION_PASS else action
                target = compiler.targets.decided(family, accepts, decided)
            rules.append(f"-m set --match-set {name} {side},dst {target}")
    for index, (action, allows) in enumerate(tier_runs(runs, tier)):
        # tier_runs made a Baseline Pass an Accept already
        run_target: str | int = pass_target if action == ACTION_PASS and pass_target is not None else action
        rules += compiler.matching(endpoint, direction, family, allows, run_target, f"{letter}{index}", tier)
    return rules


def tiered_rules(
    compiler: _Compiler, endpoint: Endpoint, direction: str, family: int, policy: DirectionPolicy
) -> list[str]:
    """The rules after the common head of a direction with tiered entries (see the layout above);
    the chain of the rest is added to the compiler's output."""
    rest: list[str] = []
    if policy.isolated:
        rest += compiler.matching(endpoint, direction, family, policy.allows, ACTION_ACCEPT, "n")
        rest.append(compiler.targets.isolated_deny(family, direction))
    else:
        rest += _tier_rules(compiler, endpoint, direction, family, policy, TIER_BASELINE, None)
        rest.append(compiler.targets.default_allow(family, direction))
    rest_chain = endpoint_chain_name(endpoint.key, direction, rest, "n")
    compiler.out.chains[family][rest_chain] = rest
    rules = _tier_rules(compiler, endpoint, direction, family, policy, TIER_ADMIN, f"-g {rest_chain}")
    rules.append(f"-g {rest_chain}")
    return rules
