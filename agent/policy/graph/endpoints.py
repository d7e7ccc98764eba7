"""Endpoints: one pod's ingress and egress allow lists, from the templates of the policies selecting it.

An allow list is memoised by (its policies' template versions, and for ingress named ports the
pod's container ports), so pods selected by the same policies share one computation. A template
that changes makes its memo entries unreachable; `forget` drops them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from agent.model.objects import Pod, PolicyType
from agent.policy.compiled import AllowEntry, DirectionAllows, EndpointPolicy, normalize_allows
from agent.policy.graph.templates import TemplateStore
from agent.policy.state import ClusterState

# Endpoint memo entries are cheap to rebuild; the cap only bounds memory after long churn.
MEMO_LIMIT = 20_000


def union(parts: list[tuple[AllowEntry, ...]]) -> tuple[AllowEntry, ...]:
    """Normalised union of normalised allow lists; a single non-empty one is reused as is (the
    common case: one policy selects the pod)."""
    non_empty = [part for part in parts if part]
    if not non_empty:
        return ()
    if len(non_empty) == 1:
        return non_empty[0]
    return normalize_allows(entry for part in non_empty for entry in part)


class EndpointCompiler:
    def __init__(self, state: ClusterState, templates: TemplateStore) -> None:
        self._state = state
        self._templates = templates
        self._memo: dict[tuple[object, ...], tuple[DirectionAllows, frozenset[int]]] = {}
        self._memo_keys_by_policy: dict[str, set[tuple[object, ...]]] = defaultdict(set)

    def compile(self, pod: Pod, selecting: Iterable[str]) -> tuple[EndpointPolicy, frozenset[int]]:
        """The endpoint policy of `pod`, selected by policies `selecting`, and the identities it names."""
        policy_keys = sorted(selecting)
        versions = tuple((k, self._templates.versions[k]) for k in policy_keys)
        templates = [self._templates[k] for k in policy_keys]
        policies = [self._state.policies[k] for k in policy_keys]
        uses_named = any(t.ingress_named for t in templates)
        ingress_key = ("ingress", versions, pod.ports if uses_named else ())
        ingress = self._memo.get(ingress_key)
        if ingress is None:
            isolated = any(PolicyType.INGRESS in p.policy_types for p in policies)
            parts = [t.ingress_entries for t in templates]
            named_entries: list[AllowEntry] = []
            for template, policy in zip(templates, policies, strict=True):
                for named in template.ingress_named:
                    port = pod.named_port(named.name, named.protocol)
                    if port is not None:
                        number = named.protocol.number
                        named_entries.extend(
                            AllowEntry(p, number, port, port, policy.key, named.rule) for p in named.peers
                        )
            parts.append(normalize_allows(named_entries))
            allows = DirectionAllows(isolated, union(parts))
            ingress = self._remember(ingress_key, policy_keys, allows)
        egress_key = ("egress", versions)
        egress = self._memo.get(egress_key)
        if egress is None:
            isolated = any(PolicyType.EGRESS in p.policy_types for p in policies)
            allows = DirectionAllows(isolated, union([t.egress_entries for t in templates]))
            egress = self._remember(egress_key, policy_keys, allows)
        endpoint = EndpointPolicy(pod.namespace, pod.name, pod.ips, ingress[0], egress[0])
        return endpoint, ingress[1] | egress[1]

    def _remember(
        self, key: tuple[object, ...], policy_keys: list[str], allows: DirectionAllows
    ) -> tuple[DirectionAllows, frozenset[int]]:
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
            self._memo_keys_by_policy.clear()
        value = (allows, allows.identities)
        self._memo[key] = value
        for policy_key in policy_keys:
            self._memo_keys_by_policy[policy_key].add(key)
        return value

    def forget(self, policy_key: str) -> None:
        """Drops memoised allow lists built from an outdated template of `policy_key`."""
        for key in self._memo_keys_by_policy.pop(policy_key, ()):
            self._memo.pop(key, None)
