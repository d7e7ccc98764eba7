"""Fitting a node's state into the dataplane's fixed capacity one NetworkPolicy at a time.

Maps and ipsets have fixed sizes. Checking them all-or-nothing let one tenant's oversized policy
make the node refuse every later version, so other tenants' revocations never took effect
(issue 21 item 9). Instead, when the compiled state does not fit, the dataplane rejects whole
policies, largest first, until it does, and applies the rest.

Rejecting fails closed: a rejected policy's allow entries are dropped, but an endpoint's
`isolated` flags are kept, so a pod the policy isolates stays isolated (with fewer allows, never
more). That holds because a node's state is isolation flags plus allows only: excepts and
(once enforced) higher-tier denies are carved out of the allows before they reach the node, so
dropping entries can only allow less. Allows without a policy name are never rejected (nothing
to name in the error).

The choice is deterministic: candidates are ordered by their cost in the map that overflows
(entries they contribute, counted without sharing), the largest first, then by name; every
apply of the same state rejects the same policies. (An ipset is different: it overflows on its
own, so every policy matching on it is rejected; iptables/dataplane.py.) A rejected policy is
tried again with every apply, so fixing or deleting the offender (or making room) brings it
back without anything else changing.

bpf checks the maps at their fullest during the update (old and new entries side by side), so a
policy may be left out only for want of that transient room; the dataplane then applies the
same state once more from what it wrote, which takes it back. The order never changes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Container, Iterable, Mapping, Set
from dataclasses import dataclass

from agent.dataplane.types import DirectionPolicy, NodeState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overflow:
    """One map (or set) the state does not fit: `needed` entries against `room`."""

    table: str
    needed: int
    room: int

    def __str__(self) -> str:
        return f"{self.table} would need {self.needed} entries but holds {self.room}"


@dataclass(frozen=True)
class Rejection:
    """A policy left out of the kernel because the node cannot hold it (see module docstring)."""

    policy: str  # "namespace/name"
    table: str  # the map or set it did not fit
    cost: int  # entries it would have taken there (without sharing)

    @property
    def message(self) -> str:
        return (
            f"{self.policy}: rejected, it needs about {self.cost} entries of {self.table}, more "
            "than this node has room for; its allow rules are not enforced (the pods it "
            "isolates stay isolated)"
        )


def strip_policies(state: NodeState, rejected: Set[str]) -> NodeState:
    """`state` without the allow entries of the `rejected` policies, isolation kept.

    Endpoints selected by the same policies share one DirectionPolicy object, which the
    compilers use to build each allow list once: the stripped copies keep that sharing."""
    if not rejected:
        return state
    stripped: dict[int, DirectionPolicy] = {}

    def strip(direction: DirectionPolicy) -> DirectionPolicy:
        done = stripped.get(id(direction))
        if done is None:
            kept = tuple(allow for allow in direction.allows if allow.policy not in rejected)
            same = len(kept) == len(direction.allows)
            done = direction if same else dataclasses.replace(direction, allows=kept)
            stripped[id(direction)] = done
        return done

    endpoints = {}
    for key, endpoint in state.endpoints.items():
        ingress, egress = strip(endpoint.ingress), strip(endpoint.egress)
        if ingress is endpoint.ingress and egress is endpoint.egress:
            endpoints[key] = endpoint
        else:
            endpoints[key] = dataclasses.replace(endpoint, ingress=ingress, egress=egress)
    return dataclasses.replace(state, endpoints=endpoints)


def distinct_directions(state: NodeState) -> Iterable[DirectionPolicy]:
    """Every allow list of `state` once (shared DirectionPolicy objects counted once)."""
    seen: set[int] = set()
    for endpoint in state.endpoints.values():
        for direction in (endpoint.ingress, endpoint.egress):
            if id(direction) not in seen:
                seen.add(id(direction))
                yield direction


def choose_rejections(
    overflows: Iterable[Overflow], costs: Mapping[str, Mapping[str, int]], rejected: Container[str]
) -> list[Rejection]:
    """Policies to reject next so that every overflowing table is estimated to fit.

    `costs[table][policy]`: the entries `policy` contributes to `table`. Per table, candidates
    go largest first (then by name) until their costs cover the overshoot. Shared entries make
    that estimate optimistic; the caller compiles again and calls this once more if needed.
    Empty when no candidate is left (the overflow is not any one policy's doing)."""
    chosen: dict[str, Rejection] = {}
    for overflow in overflows:
        table_costs = costs.get(overflow.table, {})
        candidates = sorted(
            (-cost, policy)
            for policy, cost in table_costs.items()
            if cost > 0 and policy and policy not in rejected
        )
        overshoot = overflow.needed - overflow.room
        # what the policies chosen for another table already free here
        overshoot -= sum(table_costs.get(policy, 0) for policy in chosen)
        for negative_cost, policy in candidates:
            if overshoot <= 0:
                break
            if policy not in chosen:
                chosen[policy] = Rejection(policy, overflow.table, -negative_cost)
                overshoot += negative_cost
    return sorted(chosen.values(), key=lambda r: r.policy)


def report_rejections(before: Mapping[str, Rejection], now: dict[str, Rejection]) -> dict[str, Rejection]:
    """Log what changed since the last apply (every rejection once, every recovery once); `now`."""
    for policy in sorted(now.keys() - before.keys()):
        log.error("policy %s", now[policy].message, extra={"policy": policy, "map": now[policy].table})
    for policy in sorted(before.keys() - now.keys()):
        log.info("policy %s fits again and is enforced", policy, extra={"policy": policy})
    return now
