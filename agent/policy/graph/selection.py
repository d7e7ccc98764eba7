"""Selection: which pods each policy selects (its podSelector within its namespace), both ways.

A policy added is matched against the identities of its namespace (not every pod); a pod whose
labels change is matched against the policies of its namespace only. The caller marks the
endpoints of the pods whose selecting policies changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Set

from agent.model.objects import NetworkPolicy, Pod
from agent.policy.graph.identities import IdentityIndex
from agent.policy.state import ClusterState, takes_part_in_selectors


class PolicySelection:
    def __init__(self, state: ClusterState, identities: IdentityIndex) -> None:
        self._state = state
        self._identities = identities
        self._selected: dict[str, set[str]] = {}  # policy -> pods it selects
        self._selecting: dict[str, set[str]] = defaultdict(set)  # pod -> policies selecting it
        self._ns_policies: dict[str, set[str]] = defaultdict(set)

    def selected(self, policy_key: str) -> Set[str]:
        return self._selected.get(policy_key, set())

    def selecting(self, pod_key: str) -> Set[str]:
        return self._selecting.get(pod_key, set())

    def add_policy(self, policy: NetworkPolicy) -> set[str]:
        """Indexes a policy (not held before) and returns the pods it selects."""
        key = policy.key
        self._ns_policies[policy.namespace].add(key)
        selected = {
            pod_key
            for identity in self._identities.in_namespace(policy.namespace)
            if policy.pod_selector.matches(self._identities.labels(identity))
            for pod_key in self._identities.pods[identity]
        }
        self._selected[key] = selected
        for pod_key in selected:
            self._selecting[pod_key].add(key)
        return selected

    def remove_policy(self, policy: NetworkPolicy) -> set[str]:
        """Forgets a policy and returns the pods it selected."""
        key = policy.key
        self._ns_policies[policy.namespace].discard(key)
        selected = self._selected.pop(key, set())
        for pod_key in selected:
            self._selecting[pod_key].discard(key)
            if not self._selecting[pod_key]:
                del self._selecting[pod_key]
        return selected

    def reselect(self, pod_key: str, pod: Pod | None) -> None:
        """Recomputes which policies of its namespace select the pod."""
        before = self._selecting.get(pod_key, set())
        after: set[str] = set()
        if pod is not None and takes_part_in_selectors(pod):
            after = {
                policy_key
                for policy_key in self._ns_policies.get(pod.namespace, ())
                if self._state.policies[policy_key].pod_selector.matches(pod.labels)
            }
        for policy_key in before - after:
            self._selected[policy_key].discard(pod_key)
        for policy_key in after - before:
            self._selected[policy_key].add(pod_key)
        if after:
            self._selecting[pod_key] = after
        else:
            self._selecting.pop(pod_key, None)
