"""Named ports: which pods carry each port name, and which templates a pod's named ports affect.

A named egress port compiles to the /32 or /128 of every destination pod that has the name, so a
policy's template depends on pods beyond its selectors' identities. This index keeps, per
(port name, protocol), the pods that carry it and the policies whose named egress ports may
resolve to them, and answers where one named port of one rule resolves (`destinations`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from agent.model.objects import IPAddress, IPBlock, NetworkPolicy, Pod, Protocol, Rule
from agent.policy.graph.identities import IdentityIndex
from agent.policy.graph.rules import NamedEgressDeps, SelectorKey, named_egress_deps, selector_key
from agent.policy.graph.selectors import SelectorIndex
from agent.policy.state import ClusterState, takes_part_in_selectors

PortName = tuple[str, Protocol]


def _named_port_inputs(pod: Pod) -> tuple[object, ...]:
    """The parts of a pod that named egress ports resolve from."""
    return (pod.ips, pod.ports, pod.labels, pod.host_network)


class NamedPortIndex:
    def __init__(self, state: ClusterState, identities: IdentityIndex, selectors: SelectorIndex) -> None:
        self._state = state
        self._identities = identities
        self._selectors = selectors
        self._deps: dict[str, NamedEgressDeps] = {}
        self._any_by_name: dict[PortName, set[str]] = defaultdict(set)
        self._by_selector: dict[SelectorKey, set[str]] = defaultdict(set)
        self._pods: dict[PortName, set[str]] = defaultdict(set)

    # ---- policies ----------------------------------------------------------------------------

    def add_policy(self, policy: NetworkPolicy) -> None:
        deps = named_egress_deps(policy)
        if deps is not None:
            self._deps[policy.key] = deps
            self._index(policy.key, deps, add=True)

    def remove_policy(self, policy_key: str) -> None:
        deps = self._deps.pop(policy_key, None)
        if deps is not None:
            self._index(policy_key, deps, add=False)

    def _index(self, policy_key: str, deps: NamedEgressDeps, add: bool) -> None:
        indexes: list[set[str]] = [self._by_selector[sel] for sel in deps.selectors]
        if deps.any_pod:
            indexes.extend(self._any_by_name[name] for name in deps.names)
        for index in indexes:
            if add:
                index.add(policy_key)
            else:
                index.discard(policy_key)

    # ---- pods --------------------------------------------------------------------------------

    def reindex_pod(self, key: str, old: Pod | None, pod: Pod | None) -> None:
        for source, add in ((old, False), (pod, True)):
            if source is None:
                continue
            for port in source.ports:
                if port.name is None:
                    continue
                pods = self._pods[(port.name, port.protocol)]
                if add:
                    pods.add(key)
                else:
                    pods.discard(key)

    def affected_policies(self, old: Pod | None, pod: Pod | None, identities: set[int]) -> set[str]:
        """The policies whose named egress ports may resolve differently after this pod event:
        those with a peer-less or ipBlock rule naming one of the pod's ports, and those with a
        selector that matches the pod's (old or new) `identities`."""
        if not self._deps:
            return set()
        if old is not None and pod is not None and _named_port_inputs(old) == _named_port_inputs(pod):
            return set()
        names = {
            (p.name, p.protocol)
            for source in (old, pod)
            if source is not None
            for p in source.ports
            if p.name
        }
        if not names:
            return set()
        affected: set[str] = set()
        for name in names:
            affected |= self._any_by_name.get(name, set())
        namespace = (pod or old).namespace  # type: ignore[union-attr]
        for sel in self._selectors.in_scope(namespace):
            users = self._by_selector.get(sel)
            if users and not identities.isdisjoint(self._selectors.matches[sel]):
                affected.update(k for k in users if not names.isdisjoint(self._deps[k].names))
        return affected

    # ---- resolution --------------------------------------------------------------------------

    def destinations(
        self, policy: NetworkPolicy, rule: Rule, name: str, protocol: Protocol
    ) -> set[tuple[IPAddress, int]]:
        """(pod IP, numeric port) of every pod a named egress port resolves to for this rule."""
        found: set[tuple[IPAddress, int]] = set()
        pods: Mapping[str, Pod] = self._state.pods

        def add(pod: Pod, ip_filter: IPBlock | None) -> None:
            port = pod.named_port(name, protocol)
            if port is None or not takes_part_in_selectors(pod):
                return
            found.update((ip, port) for ip in pod.ips if ip_filter is None or ip_filter.contains(ip))

        with_name = self._pods.get((name, protocol), set())
        if not rule.peers:
            for pod_key in with_name:
                add(pods[pod_key], None)
        for peer in rule.peers:
            if peer.ip_block is not None:
                for pod_key in with_name:
                    add(pods[pod_key], peer.ip_block)
                continue
            for identity in self._selectors.matches[selector_key(policy, peer)]:
                for pod_key in self._identities.pods[identity]:
                    if pod_key in with_name:
                        add(pods[pod_key], None)
        return found
