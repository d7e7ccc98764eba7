"""Fitting a NodeState into ipsets of fixed size (maxelem): compile, and when a set overflows,
reject every policy matching on it (agent/dataplane/fit.py) and compile again. Pure (no I/O).

A set overflows on its own (an ipBlock with more excepts than a set holds, an identity with more
addresses), so no subset of its users frees it: all of them go in one round, and one more
compile follows. Grouped hash:net,port sets never overflow (the compiler writes rules instead).
"""

from __future__ import annotations

from collections.abc import Callable

from agent.dataplane.base import CapacityError
from agent.dataplane.fit import Overflow, Rejection, strip_policies
from agent.dataplane.iptables.layout import DesiredState
from agent.dataplane.types import NodeState


def fit_sets(
    state: NodeState, compile_state: Callable[[NodeState], DesiredState], maxelem: int
) -> tuple[DesiredState, dict[str, Rejection]]:
    """`compile_state(state)` less the policies whose sets exceed `maxelem`, and those policies.
    Raises CapacityError for a set that some allow without a policy name (or none) uses."""
    rejected: dict[str, Rejection] = {}
    fitted = state
    while True:
        desired = compile_state(fitted)
        over = [
            Overflow(f"ipset {spec.name}", len(spec.members), maxelem)
            for spec in desired.sets.values()
            if len(spec.members) > maxelem
        ]
        if not over:
            return desired, rejected
        more = [
            Rejection(policy, overflow.table, overflow.needed)
            for overflow in over
            for policy in sorted(desired.set_users.get(overflow.table.split()[1], ()))
        ]
        if not more or any(not r.policy for r in more):
            raise CapacityError(f"{over[0].table} needs {over[0].needed} entries, maxelem is {maxelem}")
        rejected.update((r.policy, r) for r in more)
        fitted = strip_policies(state, rejected.keys())
