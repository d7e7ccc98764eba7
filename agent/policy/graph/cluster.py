"""ClusterNetworkPolicy in the compiled form: each endpoint direction's tiered entries.

For one pod and direction the rules of the Admin policies selecting it are numbered in tier order
(agent.policy.tiers: priority, then name, then rule index) and become TieredEntry values with that
rank; Baseline rules likewise, but only when no NetworkPolicy isolates the direction (otherwise
the NetworkPolicy tier always decides and Baseline is never reached). Peers stay identity-based:
a `namespaces`/`pods` peer becomes the IdentityRefs of the identities it matches, so a pod that
joins or leaves an existing identity changes only the identity table, never an entry.
`networks` and `nodes` peers become CidrRefs (a node's addresses as host routes); a
destinationNamedPort resolves on the subject pod for ingress and, for egress, to the host routes
of the destination pods carrying it (as NetworkPolicy's named egress ports).

Precedence across overlapping entries is resolved by the dataplane compilers at compile time
(first match = lowest rank); see docs/semantics.md. Fail closed: a Deny or Pass rule with a peer
or protocols entry of a newer CRD matches every address, protocol and port; in an Accept rule
such an entry matches nothing.

Invalidation is coarse and rare: the compiled entries of every pod depend on the set of
ClusterNetworkPolicies, Nodes, namespace labels and which identities exist (and, when some egress
rule names a port, on pods' ports); any change of those bumps `version`, and the resolver then
recompiles every endpoint. Ordinary pod churn inside existing identities costs nothing here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from agent.model.cluster_policy import Action, ClusterNetworkPolicy, ClusterPeer, ClusterRule, Tier
from agent.model.objects import Pod, PolicyType, Protocol
from agent.policy.compiled import (
    ACTION_ACCEPT,
    ACTION_DENY,
    ACTION_PASS,
    IPV4_ALL,
    IPV6_ALL,
    PORT_MAX,
    PORT_MIN,
    PROTOCOL_ANY,
    TIER_ADMIN,
    TIER_BASELINE,
    CidrRef,
    DirectionAllows,
    IdentityRef,
    PeerRef,
    TieredEntry,
)
from agent.policy.graph.endpoints import MEMO_LIMIT
from agent.policy.graph.identities import IdentityIndex
from agent.policy.graph.rules import rule_label
from agent.policy.state import ClusterState, takes_part_in_selectors
from agent.policy.tiers import ordered, peer_matches, selects

_ACTIONS = {Action.ACCEPT: ACTION_ACCEPT, Action.DENY: ACTION_DENY, Action.PASS: ACTION_PASS}
_TIERS = {Tier.ADMIN: TIER_ADMIN, Tier.BASELINE: TIER_BASELINE}
PortTuple = tuple[int, int, int]  # (protocol, first, last)


def _host_route(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> CidrRef:
    return CidrRef(ipaddress.ip_network(ip))


def _fails_closed(rule: ClusterRule) -> bool:
    return rule.action is not Action.ACCEPT and (
        any(peer.unknown for peer in rule.peers) or any(spec.unknown for spec in rule.ports)
    )


class ClusterTiers:
    """Compiles and memoises the tiered entries of endpoint directions."""

    def __init__(self, state: ClusterState, identities: IdentityIndex) -> None:
        self._state = state
        self._identities = identities
        self.version = 0
        self._memo: dict[tuple[object, ...], tuple[DirectionAllows, DirectionAllows]] = {}
        self._tiered: dict[tuple[object, ...], tuple[TieredEntry, ...]] = {}
        self._peers: dict[ClusterPeer, tuple[PeerRef, ...]] = {}
        self._by_tier: dict[Tier, list[ClusterNetworkPolicy]] = {}
        self._subjects: dict[int, tuple[ClusterNetworkPolicy, ...]] = {}
        self._named: dict[int, tuple[tuple[TieredEntry, ...], frozenset[int]]] = {}

    @property
    def active(self) -> bool:
        return bool(self._state.cluster_policies)

    def changed(self) -> None:
        """Something every endpoint's entries may depend on changed: forget everything."""
        self.version += 1
        self._memo.clear()
        self._tiered.clear()
        self._peers.clear()
        self._by_tier.clear()
        self._subjects.clear()
        self._named.clear()

    def uses_destination_pods(self) -> bool:
        """Does some egress rule name a port (resolved on the destination pods)?"""
        return any(
            spec.named_port is not None
            for policy in self._state.cluster_policies.values()
            for rule in policy.egress
            for spec in rule.ports
        )

    def attach(self, pod: Pod, direction: PolicyType, base: DirectionAllows) -> DirectionAllows:
        """`base` (the NetworkPolicy allows of this direction) with the tiered entries added.

        The entries depend on the pod only through which policies select it (and, for ingress
        named ports, its ports), so pods selected alike share one computation whatever their
        identities: a catch-all Admin policy over 1,000 pods is compiled once per direction."""
        if not self.active or not takes_part_in_selectors(pod):
            return base
        tiers = (Tier.ADMIN,) if base.isolated else (Tier.ADMIN, Tier.BASELINE)
        applying = tuple(
            policy
            for policy in self._selecting(pod)
            if policy.tier in tiers and (policy.ingress if direction is PolicyType.INGRESS else policy.egress)
        )
        if not applying:
            return base
        ports = pod.ports if direction is PolicyType.INGRESS else ()
        key = (direction, tuple(policy.name for policy in applying), ports)
        tiered = self._tiered.get(key)
        if tiered is None:
            entries = set(self._entries(applying, pod, direction))
            tiered = self._tiered[key] = tuple(sorted(entries, key=lambda e: e.sort_key))
            named = frozenset(e.peer.identity for e in tiered if isinstance(e.peer, IdentityRef))
            self._named[id(tiered)] = (tiered, named)
        if not tiered:
            return base
        known = self._memo.get((key, id(base)))
        if known is not None and known[0] is base:
            return known[1]
        result = DirectionAllows(base.isolated, base.allows, tiered)
        if len(self._memo) >= MEMO_LIMIT:  # NetworkPolicy edits make new bases between our changes
            self._memo.clear()
        self._memo[(key, id(base))] = (base, result)  # base kept alive: its id is not reused meanwhile
        return result

    def identities(self, direction: DirectionAllows) -> frozenset[int]:
        """The identities `direction`'s tiered entries name (computed once per entry list)."""
        known = self._named.get(id(direction.tiered))
        if known is not None and known[0] is direction.tiered:
            return known[1]
        return frozenset(e.peer.identity for e in direction.tiered if isinstance(e.peer, IdentityRef))

    def _selecting(self, pod: Pod) -> tuple[ClusterNetworkPolicy, ...]:
        """The policies of both tiers that select `pod`, in tier order; the same for every pod of
        one identity (namespace and labels decide)."""
        identity = self._identities.of_pod.get(pod.key)
        known = self._subjects.get(identity) if identity is not None else None
        if known is None:
            known = tuple(
                policy
                for tier in (Tier.ADMIN, Tier.BASELINE)
                for policy in self._ordered(tier)
                if selects(self._state, policy, pod)
            )
            if identity is not None:
                self._subjects[identity] = known
        return known

    def _ordered(self, tier: Tier) -> list[ClusterNetworkPolicy]:
        known = self._by_tier.get(tier)
        if known is None:
            known = self._by_tier[tier] = ordered(self._state, tier)
        return known

    def _entries(
        self, applying: tuple[ClusterNetworkPolicy, ...], pod: Pod, direction: PolicyType
    ) -> Iterable[TieredEntry]:
        ranks = dict.fromkeys(Tier, 0)
        for policy in applying:
            ingress = direction is PolicyType.INGRESS
            for index, rule in enumerate(policy.ingress if ingress else policy.egress):
                ranks[policy.tier] += 1
                label = rule.name or rule_label(ingress, index)
                yield from self._rule_entries(
                    policy, policy.tier, ranks[policy.tier], rule, label, pod, direction
                )

    def matches_some_peer(self, namespace: str, labels: dict[str, str]) -> bool:
        """Would an identity of (namespace, labels) be named by some `namespaces`/`pods` peer?
        When it is not, its appearing or vanishing changes no entry."""
        namespace_labels = self._state.namespace_labels(namespace)
        for policy in self._state.cluster_policies.values():
            for rule in (*policy.ingress, *policy.egress):
                for peer in rule.peers:
                    if peer.namespaces is not None and peer.namespaces.matches(namespace_labels):
                        return True
                    if (
                        peer.pods is not None
                        and peer.pods.namespace_selector.matches(namespace_labels)
                        and (peer.pods.pod_selector.matches(labels))
                    ):
                        return True
        return False

    def _rule_entries(
        self,
        policy: ClusterNetworkPolicy,
        tier: Tier,
        rank: int,
        rule: ClusterRule,
        label: str,
        pod: Pod,
        direction: PolicyType,
    ) -> Iterable[TieredEntry]:
        action = _ACTIONS[rule.action]
        if tier is Tier.BASELINE and action == ACTION_PASS:
            action = ACTION_ACCEPT  # after Baseline comes only the default allow

        def entry(peer: PeerRef, protocol: int, first: int, last: int) -> TieredEntry:
            return TieredEntry(_TIERS[tier], rank, action, peer, protocol, first, last, policy.name, label)

        if _fails_closed(rule):
            for everything in (IPV4_ALL, IPV6_ALL):
                yield entry(CidrRef(everything), PROTOCOL_ANY, PORT_MIN, PORT_MAX)
            return
        numbered: list[PortTuple] = []
        named: list[str] = []
        for spec in rule.ports:
            if spec.unknown:
                continue  # Accept rule: an entry we cannot read matches nothing
            if spec.named_port is not None:
                named.append(spec.named_port)
            elif spec.protocol is not None:
                numbered.append((spec.protocol.number, spec.first, spec.last))
        if not rule.ports:
            numbered.append((PROTOCOL_ANY, PORT_MIN, PORT_MAX))
        peers = [peer for peer in rule.peers if not peer.unknown]
        refs = [ref for peer in peers for ref in self._peer_refs(peer)]
        for ref in refs:
            for protocol, first, last in numbered:
                yield entry(ref, protocol, first, last)
        for name in named:
            for named_protocol in Protocol:
                if direction is PolicyType.INGRESS:  # resolved on the subject itself
                    port = pod.named_port(name, named_protocol)
                    if port is not None:
                        for ref in refs:
                            yield entry(ref, named_protocol.number, port, port)
                    continue
                for ip, port in self._destinations(name, named_protocol, peers):
                    yield entry(_host_route(ip), named_protocol.number, port, port)

    def _destinations(
        self, name: str, protocol: Protocol, peers: list[ClusterPeer]
    ) -> Iterable[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        """(IP, port) of every destination pod a named egress port resolves to: a pod that
        takes part in selectors, carries the name and matches one of the rule's peers."""
        for other in self._state.pods.values():
            port = other.named_port(name, protocol) if takes_part_in_selectors(other) else None
            if port is not None and any(peer_matches(self._state, peer, other) for peer in peers):
                yield from ((ip, port) for ip in other.ips)

    def _peer_refs(self, peer: ClusterPeer) -> tuple[PeerRef, ...]:
        known = self._peers.get(peer)
        if known is None:
            known = self._peers[peer] = tuple(self._resolve(peer))
        return known

    def _resolve(self, peer: ClusterPeer) -> Iterable[PeerRef]:
        if peer.networks:
            yield from (CidrRef(net) for net in peer.networks)
        elif peer.nodes is not None:
            nodes = [node for node in self._state.nodes.values() if peer.nodes.matches(node.labels)]
            addresses = {address for node in nodes for address in node.addresses}
            yield from (_host_route(a) for a in sorted(addresses, key=lambda a: (a.version, int(a))))
        elif peer.namespaces is not None or peer.pods is not None:
            for identity in sorted(self._identities.pods):
                namespace = self._identities.namespace(identity)
                namespace_labels = self._state.namespace_labels(namespace)
                if peer.namespaces is not None:
                    matches = peer.namespaces.matches(namespace_labels)
                else:
                    assert peer.pods is not None
                    matches = peer.pods.namespace_selector.matches(namespace_labels) and (
                        peer.pods.pod_selector.matches(self._identities.labels(identity))
                    )
                if matches:
                    yield IdentityRef(identity)
        # domainNames: nothing (podfence never sees names)
