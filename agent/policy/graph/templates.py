"""Policy templates: one policy's allow entries with its peers resolved, whichever pod it selects.

A template is recomputed only when its policy or the pods its named egress ports resolve to
changed (`mark_dirty`, then `flush`); when a selector's matches change it is patched in place
where its patch plan allows. Each installed template gets a new version, and `on_changed` is
told only when a template really differs, so endpoints recompile only then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.model.objects import NetworkPolicy, PolicyType, Protocol, Rule
from agent.policy.compiled import (
    IPV4_ALL,
    IPV6_ALL,
    AllowEntry,
    CidrRef,
    IdentityRef,
    PeerRef,
    normalize_allows,
)
from agent.policy.graph.named_ports import NamedPortIndex
from agent.policy.graph.rules import (
    PortRange,
    SelectorKey,
    Slots,
    host_network,
    identity_ref,
    named_ports,
    patch_plan,
    port_ranges,
    rule_label,
    selector_key,
)
from agent.policy.graph.selectors import SelectorIndex
from agent.policy.state import ClusterState


@dataclass(frozen=True)
class NamedIngress:
    """An ingress named port, resolved later against each selected pod's own container ports."""

    peers: tuple[PeerRef, ...]
    name: str
    protocol: Protocol
    rule: str = ""  # AllowEntry.rule of the rule it came from


@dataclass(frozen=True)
class Template:
    """One policy with its peers resolved; independent of which pod it is applied to."""

    ingress_entries: tuple[AllowEntry, ...]
    ingress_named: tuple[NamedIngress, ...]
    egress_entries: tuple[AllowEntry, ...]


def patched_entries(
    entries: tuple[AllowEntry, ...],
    policy_key: str,
    slot_ranges: list[tuple[tuple[PortRange, ...], str]],
    added: set[int],
    removed: set[int],
) -> tuple[AllowEntry, ...]:
    """`entries` with identities `removed` dropped and `added` allowed on each of `slot_ranges`
    (a rule's port ranges and its name)."""
    if not slot_ranges:
        return entries
    if removed:
        entries = tuple(
            e for e in entries if not (isinstance(e.peer, IdentityRef) and e.peer.identity in removed)
        )
    if added:
        fresh = [
            AllowEntry(identity_ref(identity), protocol, first, last, policy_key, rule)
            for identity in added
            for ranges, rule in slot_ranges
            for protocol, first, last in ranges
        ]
        entries = normalize_allows([*entries, *fresh])
    return entries


class TemplateStore:
    def __init__(
        self,
        state: ClusterState,
        selectors: SelectorIndex,
        named: NamedPortIndex,
        on_changed: Callable[[str], None],
    ) -> None:
        self._state = state
        self._selectors = selectors
        self._named = named
        self._on_changed = on_changed
        self._templates: dict[str, Template] = {}
        self.versions: dict[str, int] = {}
        self._version_counter = 0
        self._dirty: set[str] = set()
        self._patch_plans: dict[str, dict[SelectorKey, Slots | None]] = {}

    def __getitem__(self, policy_key: str) -> Template:
        return self._templates[policy_key]

    def add_policy(self, policy: NetworkPolicy) -> None:
        """Builds the template of a policy not held before (its selectors already acquired)."""
        key = policy.key
        self._templates[key] = self._compute(policy)
        self.versions[key] = self._next_version()
        self._patch_plans[key] = patch_plan(policy)
        self._dirty.discard(key)

    def remove_policy(self, policy_key: str) -> None:
        self._templates.pop(policy_key, None)
        self.versions.pop(policy_key, None)
        self._patch_plans.pop(policy_key, None)
        self._dirty.discard(policy_key)

    def mark_dirty(self, policy_keys: Iterable[str]) -> None:
        self._dirty.update(policy_keys)

    def flush(self) -> None:
        """Recomputes templates whose inputs changed; reports only a real difference."""
        while self._dirty:
            key = self._dirty.pop()
            policy = self._state.policies.get(key)
            if policy is None:
                continue
            self._install(key, self._compute(policy))

    def selector_changed(self, sel: SelectorKey, added: set[int], removed: set[int]) -> None:
        """Identities joined or left selector `sel`: patch the templates that use it in place (a wide
        selector is shared by many policies, and rebuilding each from scratch is what made one
        new identity cost a full recompute of every policy using it), or queue a recompute."""
        for policy_key in self._selectors.users(sel):
            template = self._templates.get(policy_key)
            if template is None or policy_key in self._dirty:
                continue  # being built, or about to be rebuilt from the current matches anyway
            plan = self._patch_plans[policy_key]
            slots = plan.get(sel, ())
            matches = self._selectors.matches
            if slots is None or (
                removed and any(i in matches[other] for other in plan if other != sel for i in removed)
            ):
                self._dirty.add(policy_key)
                continue
            if not slots:
                continue  # the selector is only in rules of a direction the policy does not enforce
            ingress = [(r, name) for i, r, name in slots if i]
            egress = [(r, name) for i, r, name in slots if not i]
            patched = Template(
                patched_entries(template.ingress_entries, policy_key, ingress, added, removed),
                template.ingress_named,
                patched_entries(template.egress_entries, policy_key, egress, added, removed),
            )
            self._install(policy_key, patched)

    def _install(self, policy_key: str, template: Template) -> None:
        if template == self._templates.get(policy_key):
            return
        self._templates[policy_key] = template
        self.versions[policy_key] = self._next_version()
        self._on_changed(policy_key)

    def _next_version(self) -> int:
        self._version_counter += 1
        return self._version_counter

    # ---- computation -------------------------------------------------------------------------

    def _peer_refs(self, policy: NetworkPolicy, rule: Rule) -> tuple[PeerRef, ...]:
        if not rule.peers:
            return (CidrRef(IPV4_ALL), CidrRef(IPV6_ALL))
        refs: list[PeerRef] = []
        for peer in rule.peers:
            if peer.ip_block is not None:
                refs.append(CidrRef(peer.ip_block.cidr, peer.ip_block.excepts))
            else:
                matches = self._selectors.matches[selector_key(policy, peer)]
                refs.extend(identity_ref(i) for i in sorted(matches))
        return tuple(refs)

    def _compute(self, policy: NetworkPolicy) -> Template:
        ingress_entries: list[AllowEntry] = []
        ingress_named: list[NamedIngress] = []
        egress_entries: list[AllowEntry] = []
        key = policy.key
        if PolicyType.INGRESS in policy.policy_types:
            for index, rule in enumerate(policy.ingress):
                peers = self._peer_refs(policy, rule)
                label = rule_label(True, index)
                for protocol, first, last in port_ranges(rule):
                    ingress_entries.extend(AllowEntry(p, protocol, first, last, key, label) for p in peers)
                ingress_named.extend(
                    NamedIngress(peers, name, proto, label) for name, proto in named_ports(rule)
                )
        if PolicyType.EGRESS in policy.policy_types:
            for index, rule in enumerate(policy.egress):
                peers = self._peer_refs(policy, rule)
                label = rule_label(False, index)
                for protocol, first, last in port_ranges(rule):
                    egress_entries.extend(AllowEntry(p, protocol, first, last, key, label) for p in peers)
                for name, proto in named_ports(rule):
                    for ip, port in sorted(
                        self._named.destinations(policy, rule, name, proto),
                        key=lambda d: (d[0].version, int(d[0]), d[1]),
                    ):
                        peer = CidrRef(host_network(ip))
                        egress_entries.append(AllowEntry(peer, proto.number, port, port, key, label))
        return Template(
            normalize_allows(ingress_entries), tuple(ingress_named), normalize_allows(egress_entries)
        )
