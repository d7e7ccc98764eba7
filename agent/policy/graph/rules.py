"""What a policy's rules ask of the graph, derived from the policy alone (pure functions, no index).

A peer selector is keyed by `SelectorKey`; a rule's ports become numeric ranges plus named ports;
a policy's named egress ports name their dependencies (`NamedEgressDeps`), and its patch plan
(`patch_plan`) tells the template store where one selector's identities land, so a selector
change can patch a template in place instead of recomputing it. Identity ids are derived here too,
as they are a pure function of (namespace, labels).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from collections import defaultdict
from dataclasses import dataclass

from agent.model.objects import (
    IPAddress,
    Labels,
    LabelSelector,
    NetworkPolicy,
    Peer,
    PolicyType,
    Protocol,
    Rule,
)
from agent.policy.compiled import PORT_MAX, PORT_MIN, PROTOCOL_ANY, IdentityRef

# (own namespace or None, namespace selector or None, pod selector or None): one peer's selectors.
# Exactly one of the first two is set: no namespaceSelector means "the policy's own namespace".
SelectorKey = tuple[str | None, LabelSelector | None, LabelSelector | None]

# (protocol number, first port, last port)
PortRange = tuple[int, int, int]

# Where one selector's identities land in a policy's template: (is ingress, numeric port ranges)
# per rule that names it. None = some rule pairs it with named ports; recompute the template.
# (ingress?, the rule's port ranges, the rule's name as AllowEntry.rule spells it)
Slots = tuple[tuple[bool, tuple[PortRange, ...], str], ...]


def identity_id(namespace: str, labels: Labels) -> int:
    """Stable 64-bit id of (namespace, label set): the same in every process and replica, never 0."""
    canonical = json.dumps([namespace, [list(kv) for kv in labels]], separators=(",", ":"))
    value = int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big")
    return value or 1


@functools.lru_cache(maxsize=1 << 17)
def identity_ref(identity: int) -> IdentityRef:
    """Shared IdentityRef objects: a wide selector puts the same identities in many templates."""
    return IdentityRef(identity)


@functools.lru_cache(maxsize=1 << 16)
def host_network(ip: IPAddress) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The single-address network of `ip` (/32 or /128); cached, as building one parses text."""
    return ipaddress.ip_network(ip)


def port_ranges(rule: Rule) -> tuple[PortRange, ...]:
    """The numeric (protocol, first, last) ranges of a rule; no ports = every protocol and port."""
    if not rule.ports:
        return ((PROTOCOL_ANY, PORT_MIN, PORT_MAX),)
    ranges: list[PortRange] = []
    for spec in rule.ports:
        if spec.port is None:
            ranges.append((spec.protocol.number, PORT_MIN, PORT_MAX))
        elif isinstance(spec.port, int):
            last = spec.end_port if spec.end_port is not None else spec.port
            ranges.append((spec.protocol.number, spec.port, last))
    return tuple(ranges)


def named_ports(rule: Rule) -> tuple[tuple[str, Protocol], ...]:
    return tuple((spec.port, spec.protocol) for spec in rule.ports if isinstance(spec.port, str))


def selector_key(policy: NetworkPolicy, peer: Peer) -> SelectorKey:
    if peer.namespace_selector is None:
        return (policy.namespace, None, peer.pod_selector)
    return (None, peer.namespace_selector, peer.pod_selector)


def policy_selector_keys(policy: NetworkPolicy) -> set[SelectorKey]:
    return {
        selector_key(policy, peer)
        for rule in (*policy.ingress, *policy.egress)
        for peer in rule.peers
        if peer.ip_block is None
    }


@dataclass(frozen=True)
class NamedEgressDeps:
    """What a policy's named egress ports depend on: pods with these port names that match these
    selectors, or (for ipBlock and peer-less rules) any pod with these port names."""

    names: frozenset[tuple[str, Protocol]]
    selectors: frozenset[SelectorKey]
    any_pod: bool


def named_egress_deps(policy: NetworkPolicy) -> NamedEgressDeps | None:
    if PolicyType.EGRESS not in policy.policy_types:
        return None
    names: set[tuple[str, Protocol]] = set()
    selectors: set[SelectorKey] = set()
    any_pod = False
    for rule in policy.egress:
        rule_names = named_ports(rule)
        if not rule_names:
            continue
        names.update(rule_names)
        any_pod = any_pod or not rule.peers or any(p.ip_block is not None for p in rule.peers)
        selectors.update(selector_key(policy, p) for p in rule.peers if p.ip_block is None)
    if not names:
        return None
    return NamedEgressDeps(frozenset(names), frozenset(selectors), any_pod)


def rule_label(is_ingress: bool, index: int) -> str:
    """How AllowEntry.rule names the `index`th rule of a direction: "ingress[0]", "egress[2]"."""
    return f"{'ingress' if is_ingress else 'egress'}[{index}]"


def patch_plan(policy: NetworkPolicy) -> dict[SelectorKey, Slots | None]:
    slots: dict[SelectorKey, list[tuple[bool, tuple[PortRange, ...], str]]] = defaultdict(list)
    with_named: set[SelectorKey] = set()
    for is_ingress, policy_type, rules in (
        (True, PolicyType.INGRESS, policy.ingress),
        (False, PolicyType.EGRESS, policy.egress),
    ):
        if policy_type not in policy.policy_types:
            continue
        for index, rule in enumerate(rules):
            for peer in rule.peers:
                if peer.ip_block is not None:
                    continue
                sel = selector_key(policy, peer)
                slots[sel].append((is_ingress, port_ranges(rule), rule_label(is_ingress, index)))
                if named_ports(rule):
                    with_named.add(sel)
    return {sel: None if sel in with_named else tuple(s) for sel, s in slots.items()}
