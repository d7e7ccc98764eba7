"""Audit (staged) policies: the enforced view and the audit view of one cluster state.

A NetworkPolicy or ClusterNetworkPolicy annotated `podfence.io/mode: audit` is evaluated but not
enforced. Two views of the same state follow from it:

- the enforced view leaves every audit policy out: it is what the kernel enforces, so an audit
  policy can never change a packet's fate (it neither opens nor closes anything);
- the audit view treats every audit policy as enforced: what the cluster would enforce once the
  audit policies are switched to `enforce`.

A flow the enforced view allows and the audit view denies is *audit-denied*: it passes, and is
recorded with the audit view's deciding policy and rule. By NetworkPolicy semantics an audit
NetworkPolicy can newly deny only by isolating a pod that no enforced NetworkPolicy isolates (a
union of allows never shrinks); an audit ClusterNetworkPolicy Deny (or a Pass handing over to an
isolating NetworkPolicy) can newly deny anywhere. `audit_all` (the agent's `--audit-all`) puts
every policy in audit: the enforced view then has no policy at all.

The evaluator (agent.policy.evaluator, agent.policy.tiers) and the resolver skip audit policies
themselves, so whatever judges a state judges its enforced view, and no caller can mistake an audit
policy for an enforced one; the audit view is the state with every policy's mode set to enforce.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import overload

from agent.model.cluster_policy import ClusterNetworkPolicy
from agent.model.objects import NetworkPolicy, Protocol
from agent.policy.evaluator import DirectionVerdict, Endpoint, Verdict, evaluate
from agent.policy.state import ClusterState


def has_audit(state: ClusterState, audit_all: bool = False) -> bool:
    """Does any policy of `state` stand in audit (so the two views can differ)?"""
    if audit_all:
        return bool(state.policies or state.cluster_policies)
    return any(p.audit for p in state.policies.values()) or any(
        p.audit for p in state.cluster_policies.values()
    )


def enforced_view(state: ClusterState, audit_all: bool = False) -> ClusterState:
    """What the kernel enforces: the evaluator and the resolver skip audit policies themselves, so
    this is `state`, or `state` without any policy under `audit_all`."""
    if not audit_all:
        return state
    return ClusterState(namespaces=state.namespaces, pods=state.pods, nodes=state.nodes)


def audit_view(state: ClusterState) -> ClusterState:
    """`state` with every audit policy enforced (its mode switched to `enforce`)."""
    return ClusterState(
        namespaces=state.namespaces,
        pods=state.pods,
        policies={k: as_enforced(p) for k, p in state.policies.items()},
        cluster_policies={k: as_enforced(p) for k, p in state.cluster_policies.items()},
        nodes=state.nodes,
    )


@overload
def as_enforced(policy: NetworkPolicy) -> NetworkPolicy: ...
@overload
def as_enforced(policy: ClusterNetworkPolicy) -> ClusterNetworkPolicy: ...
@overload
def as_enforced(policy: NetworkPolicy | ClusterNetworkPolicy) -> NetworkPolicy | ClusterNetworkPolicy: ...


def as_enforced(policy: NetworkPolicy | ClusterNetworkPolicy) -> NetworkPolicy | ClusterNetworkPolicy:
    """`policy` as if annotated `podfence.io/mode: enforce` (itself when it is)."""
    return replace(policy, audit=False) if policy.audit else policy


@dataclass(frozen=True)
class StagedVerdict:
    """The enforced verdict (the packet's fate) and, when an audit policy exists, the audit one."""

    enforced: Verdict
    audit: Verdict | None = None

    @property
    def audit_denied(self) -> bool:
        """Passes today, would be denied with the audit policies enforced."""
        return self.enforced.allowed and self.audit is not None and not self.audit.allowed

    def audit_denying(self) -> list[tuple[str, DirectionVerdict]]:
        """The directions ("egress", "ingress") whose audit verdict newly denies, with it."""
        if not self.audit_denied or self.audit is None:
            return []
        pairs = (
            ("egress", self.enforced.egress, self.audit.egress),
            ("ingress", self.enforced.ingress, self.audit.ingress),
        )
        return [(name, audit) for name, enforced, audit in pairs if enforced.allowed and not audit.allowed]


def evaluate_staged(
    state: ClusterState,
    src: Endpoint,
    dst: Endpoint,
    protocol: Protocol | int,
    port: int,
    audit_all: bool = False,
) -> StagedVerdict:
    """Judges a new connection in both views; `audit` is None when no policy is in audit."""
    enforced = evaluate(enforced_view(state, audit_all), src, dst, protocol, port)
    if not has_audit(state, audit_all):
        return StagedVerdict(enforced)
    return StagedVerdict(enforced, evaluate(audit_view(state), src, dst, protocol, port))
