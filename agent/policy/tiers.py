"""ClusterNetworkPolicy tiers in the reference evaluator: which Admin or Baseline rule decides.

For one pod and one direction (tests/data/npa/SPEC.md, section 4):
  Admin tier -> NetworkPolicy -> Baseline tier -> allow.
Inside a tier the policies that select the pod are walked in `ClusterNetworkPolicy.order()`
(priority ascending, then name: the API leaves equal priorities undefined, podfence breaks the tie
by name so that every replica, the evaluator and the dataplanes agree), and each policy's rules in
list order. The first rule that matches decides: Accept and Deny end the evaluation of this
direction, Pass skips the rest of the tier. Being a subject isolates nothing by itself.

Decisions where the API leaves room (shared with the compiler, agent.policy.graph.cluster):
- Host-network pods and bare IPs are never subjects, and `namespaces`/`pods` peers never match
  them; `networks` and `nodes` peers match them by IP (a host-network pod's IP is its node's).
- A pod talking to its own IP (hairpin without a Service) is not judged by any tier here.
- `domainNames` peers match nothing: podfence judges IP packets and never sees names.
- A peer or protocols entry of a newer CRD (`unknown`) fails closed: it matches nothing in an
  Accept rule and makes a Deny or Pass rule match everything.
- `destinationNamedPort` resolves on the destination pod (the subject for ingress, the peer for
  egress); a destination without that port name, or that is not a pod, never matches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.model.cluster_policy import (
    Action,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    NamespacedPods,
    Tier,
)
from agent.model.objects import IPAddress, Pod, PolicyType, Protocol
from agent.policy.state import ClusterState, takes_part_in_selectors

_PROTOCOLS_BY_NUMBER = {p.number: p for p in Protocol}


@dataclass(frozen=True)
class ClusterRuleMatch:
    """Rule `index` (named `name`, maybe "") of the direction's rule list of ClusterNetworkPolicy
    `policy` matched, with `action`."""

    tier: Tier
    policy: str
    priority: int
    index: int
    name: str
    action: Action

    def describe(self, direction: str) -> str:
        label = f" '{self.name}'" if self.name else ""
        where = f"{self.policy} (priority {self.priority}) {direction}[{self.index}]{label}"
        return f"{self.tier.value} tier: {where} -> {self.action.value}"


def _pod(endpoint: Pod | IPAddress) -> Pod | None:
    if isinstance(endpoint, Pod) and takes_part_in_selectors(endpoint):
        return endpoint
    return None


def _ips(endpoint: Pod | IPAddress) -> tuple[IPAddress, ...]:
    return endpoint.ips if isinstance(endpoint, Pod) else (endpoint,)


def _pods_match(state: ClusterState, selector: NamespacedPods, pod: Pod) -> bool:
    return selector.namespace_selector.matches(state.namespace_labels(pod.namespace)) and (
        selector.pod_selector.matches(pod.labels)
    )


def selects(state: ClusterState, policy: ClusterNetworkPolicy, pod: Pod) -> bool:
    """Is `pod` (a pod that takes part in selectors) a subject of `policy`?"""
    if policy.subject_namespaces is not None:
        return policy.subject_namespaces.matches(state.namespace_labels(pod.namespace))
    assert policy.subject_pods is not None
    return _pods_match(state, policy.subject_pods, pod)


def peer_matches(state: ClusterState, peer: ClusterPeer, other: Pod | IPAddress) -> bool:
    """Does the far side of the connection match one (known) peer?"""
    if peer.networks:
        return any(ip.version == net.version and ip in net for ip in _ips(other) for net in peer.networks)
    if peer.nodes is not None:
        addresses = {
            a for node in state.nodes.values() if peer.nodes.matches(node.labels) for a in node.addresses
        }
        return any(ip in addresses for ip in _ips(other))
    pod = _pod(other)
    if pod is None:
        return False  # namespaces/pods peers never match host-network pods or bare IPs
    if peer.namespaces is not None:
        return peer.namespaces.matches(state.namespace_labels(pod.namespace))
    if peer.pods is not None:
        return _pods_match(state, peer.pods, pod)
    return False  # domainNames, and unknown peers (handled by the rule)


def port_matches(spec: ClusterPort, protocol: Protocol | None, port: int, dst: Pod | IPAddress) -> bool:
    if protocol is None or spec.unknown:
        return False
    if spec.named_port is not None:
        pod = _pod(dst)
        return pod is not None and pod.named_port(spec.named_port, protocol) == port
    return spec.protocol is protocol and spec.first <= port <= spec.last


def rule_matches(
    state: ClusterState,
    rule: ClusterRule,
    other: Pod | IPAddress,
    dst: Pod | IPAddress,
    protocol: Protocol | int,
    port: int,
) -> bool:
    if rule.action is not Action.ACCEPT and (
        any(peer.unknown for peer in rule.peers) or any(spec.unknown for spec in rule.ports)
    ):
        return True  # fail closed: a Deny or Pass rule we cannot fully read matches everything
    known = protocol if isinstance(protocol, Protocol) else _PROTOCOLS_BY_NUMBER.get(protocol)
    if rule.ports and not any(port_matches(spec, known, port, dst) for spec in rule.ports):
        return False
    return any(peer_matches(state, peer, other) for peer in rule.peers)


def ordered(state: ClusterState, tier: Tier) -> list[ClusterNetworkPolicy]:
    """The tier's enforced policies (audit ones take no part: agent.policy.audit) in precedence
    order (priority, then name)."""
    return sorted(
        (p for p in state.cluster_policies.values() if p.tier is tier and not p.audit),
        key=ClusterNetworkPolicy.order,
    )


def judge_tier(
    state: ClusterState,
    tier: Tier,
    pod: Pod,
    other: Pod | IPAddress,
    direction: PolicyType,
    dst: Pod | IPAddress,
    protocol: Protocol | int,
    port: int,
) -> ClusterRuleMatch | None:
    """The first rule of `tier` that matches this direction on subject `pod`: an Accept or Deny
    that decides, or a Pass that hands over to the next tier. None when no rule matches."""
    for policy in ordered(state, tier):
        rules = policy.ingress if direction is PolicyType.INGRESS else policy.egress
        if not rules or not selects(state, policy, pod):
            continue
        for index, rule in enumerate(rules):
            if rule_matches(state, rule, other, dst, protocol, port):
                return ClusterRuleMatch(tier, policy.name, policy.priority, index, rule.name, rule.action)
    return None
