"""The reference evaluator: the executable form of NetworkPolicy semantics, and the test oracle.

Each direction goes through the tiers Admin (ClusterNetworkPolicy) -> NetworkPolicy -> Baseline
(ClusterNetworkPolicy) -> allow; agent.policy.tiers judges the two ClusterNetworkPolicy tiers.

It reads ClusterState objects directly and never the compiled form, so comparing the two checks
the compiler. It judges pod-level policy only: host-traffic exceptions (kubelet probes) and
connection state are the dataplane's business.

A connection from `src` to `dst` is allowed iff egress allows it on the source pod AND ingress
allows it on the destination pod. A bare IP (or a hostNetwork pod, which is seen only by its IPs)
has no policy of its own, so that side's direction is not isolated. An ipBlock matches a pod if
it contains any of the pod's IPs; to judge one address of a dual-stack pod, pass that IP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from agent.model.cluster_policy import Action, Tier
from agent.model.objects import IPAddress, NetworkPolicy, Peer, Pod, PolicyType, PortSpec, Protocol, Rule
from agent.policy.state import ClusterState, takes_part_in_selectors
from agent.policy.tiers import ClusterRuleMatch, judge_tier

Endpoint = Pod | IPAddress

_PROTOCOLS_BY_NUMBER = {p.number: p for p in Protocol}


@dataclass(frozen=True)
class RuleMatch:
    """Rule `index` of the `policy` ("ns/name") direction's rule list allowed the connection."""

    policy: str
    index: int


TIER_NETWORK_POLICY = "NetworkPolicy"


@dataclass(frozen=True)
class DirectionVerdict:
    """One direction's judgement. `tier` is the tier that decided ("Admin", "NetworkPolicy",
    "Baseline"), None when none did (allowed by default). `rule` is the ClusterNetworkPolicy rule
    that decided (Admin or Baseline tier); `passed` the Pass rule(s) that handed over to a later
    tier. For the NetworkPolicy tier: `isolating` = every NetworkPolicy that selects the pod for this
    direction, `allowing` the rules that allowed it; `isolated` says whether any did."""

    isolated: bool = False
    allowed: bool = True
    allowing: tuple[RuleMatch, ...] = ()
    isolating: tuple[str, ...] = ()
    tier: str | None = None
    rule: ClusterRuleMatch | None = None
    passed: tuple[ClusterRuleMatch, ...] = ()

    @property
    def policies(self) -> tuple[str, ...]:
        """The policies that decided: the ClusterNetworkPolicy whose rule decided, else the
        NetworkPolicies whose rules allowed it, else those that isolated it."""
        if self.rule is not None:
            return (self.rule.policy,)
        if self.allowing:
            return tuple(dict.fromkeys(m.policy for m in self.allowing))
        return self.isolating


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    egress: DirectionVerdict
    ingress: DirectionVerdict


def _as_protocol(protocol: Protocol | int) -> Protocol | None:
    """The Protocol a `ports` entry can name, or None (ICMP and others: only port-less rules)."""
    if isinstance(protocol, Protocol):
        return protocol
    return _PROTOCOLS_BY_NUMBER.get(protocol)


def _ips(endpoint: Endpoint) -> tuple[IPAddress, ...]:
    return endpoint.ips if isinstance(endpoint, Pod) else (endpoint,)


def _selector_pod(endpoint: Endpoint) -> Pod | None:
    """The pod that policies and pod selectors see, or None for a bare IP / hostNetwork pod."""
    if isinstance(endpoint, Pod) and takes_part_in_selectors(endpoint):
        return endpoint
    return None


def policies_selecting(state: ClusterState, pod: Pod, direction: PolicyType) -> list[NetworkPolicy]:
    """Enforced policies (audit ones take no part: agent.policy.audit) that select `pod` and have
    `direction` in policyTypes, in key order."""
    return [
        policy
        for key, policy in sorted(state.policies.items())
        if not policy.audit
        and policy.namespace == pod.namespace
        and direction in policy.policy_types
        and policy.pod_selector.matches(pod.labels)
    ]


def peer_matches(state: ClusterState, policy: NetworkPolicy, peer: Peer, other: Endpoint) -> bool:
    """Does `other` (the far side of the connection) match one from/to entry of `policy`?"""
    if peer.ip_block is not None:
        return any(peer.ip_block.contains(ip) for ip in _ips(other))
    pod = _selector_pod(other)
    if pod is None:
        return False
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not peer.namespace_selector.matches(state.namespace_labels(pod.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


def port_matches(spec: PortSpec, protocol: Protocol | None, port: int, dst: Endpoint) -> bool:
    """One `ports` entry against the connection; named ports resolve on the destination pod."""
    if protocol is None or spec.protocol is not protocol:
        return False
    if spec.port is None:
        return True
    if isinstance(spec.port, str):
        pod = _selector_pod(dst)
        return pod is not None and pod.named_port(spec.port, protocol) == port
    last = spec.end_port if spec.end_port is not None else spec.port
    return spec.port <= port <= last


def rule_matches(
    state: ClusterState,
    policy: NetworkPolicy,
    rule: Rule,
    other: Endpoint,
    dst: Endpoint,
    protocol: Protocol | int,
    port: int,
) -> bool:
    known = _as_protocol(protocol)
    if rule.ports and not any(port_matches(spec, known, port, dst) for spec in rule.ports):
        return False
    return not rule.peers or any(peer_matches(state, policy, peer, other) for peer in rule.peers)


def judge_direction(
    state: ClusterState,
    subject: Endpoint,
    other: Endpoint,
    direction: PolicyType,
    dst: Endpoint,
    protocol: Protocol | int,
    port: int,
) -> DirectionVerdict:
    """Judges one direction on `subject` (the source for egress, the destination for ingress):
    Admin tier, then NetworkPolicy, then Baseline tier, then allow."""
    pod = _selector_pod(subject)
    if pod is None:
        return DirectionVerdict()
    # A pod reaching its own IP is not subject to ClusterNetworkPolicy (SPEC.md, hairpin).
    tiered = not (isinstance(other, Pod) and other.key == pod.key)
    passed: list[ClusterRuleMatch] = []
    if tiered:
        admin = judge_tier(state, Tier.ADMIN, pod, other, direction, dst, protocol, port)
        if admin is not None and admin.action is not Action.PASS:
            return DirectionVerdict(allowed=admin.action is Action.ACCEPT, tier=Tier.ADMIN.value, rule=admin)
        if admin is not None:
            passed.append(admin)
    network_policy = _judge_network_policies(state, pod, other, direction, dst, protocol, port)
    if network_policy.isolated or not tiered:
        return replace(network_policy, passed=tuple(passed))
    baseline = judge_tier(state, Tier.BASELINE, pod, other, direction, dst, protocol, port)
    if baseline is not None and baseline.action is not Action.PASS:
        allowed = baseline.action is Action.ACCEPT
        tier = Tier.BASELINE.value
        return DirectionVerdict(allowed=allowed, tier=tier, rule=baseline, passed=tuple(passed))
    if baseline is not None:
        passed.append(baseline)
    return DirectionVerdict(passed=tuple(passed))


def _judge_network_policies(
    state: ClusterState,
    pod: Pod,
    other: Endpoint,
    direction: PolicyType,
    dst: Endpoint,
    protocol: Protocol | int,
    port: int,
) -> DirectionVerdict:
    """The NetworkPolicy tier: decides (allowed or not) iff some NetworkPolicy isolates `pod`."""
    selecting = policies_selecting(state, pod, direction)
    if not selecting:
        return DirectionVerdict()
    allowing: list[RuleMatch] = []
    for policy in selecting:
        rules = policy.ingress if direction is PolicyType.INGRESS else policy.egress
        for index, rule in enumerate(rules):
            if rule_matches(state, policy, rule, other, dst, protocol, port):
                allowing.append(RuleMatch(policy.key, index))
    return DirectionVerdict(
        isolated=True,
        allowed=bool(allowing),
        allowing=tuple(allowing),
        isolating=tuple(p.key for p in selecting),
        tier=TIER_NETWORK_POLICY,
    )


def evaluate(
    state: ClusterState, src: Endpoint, dst: Endpoint, protocol: Protocol | int, port: int
) -> Verdict:
    """Is a new connection src -> dst:port/protocol allowed by ClusterNetworkPolicy and NetworkPolicy?

    `protocol` may be a number (1 for ICMP), which only rules without `ports` allow; pass port 0
    for protocols without ports."""
    egress = judge_direction(state, src, dst, PolicyType.EGRESS, dst, protocol, port)
    ingress = judge_direction(state, dst, src, PolicyType.INGRESS, dst, protocol, port)
    return Verdict(allowed=egress.allowed and ingress.allowed, egress=egress, ingress=ingress)


def parse_endpoint(state: ClusterState, text: str) -> Endpoint:
    """ "NAMESPACE/POD" naming a pod in `state`, or an IP address. An IP that belongs to a pod
    stands for that pod (what the wire would show); any other IP is a bare address.
    Raises ValueError saying what is wrong."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        owners = [p for p in state.pods.values() if address in p.ips and takes_part_in_selectors(p)]
        return owners[0] if len(owners) == 1 else address
    if text.count("/") != 1:
        raise ValueError(f"{text!r} is neither NAMESPACE/POD nor an IP address")
    pod = state.pods.get(text)
    if pod is None:
        raise ValueError(f"unknown pod {text!r}")
    return pod
