"""Identities: which pods share one (namespace, label set), and the IPs each identity stands for.

A pod event moves the pod between identities; only the first pod joining an identity or the last
one leaving it matters to the selectors (the caller then tells the selector index), every other
membership change only changes the identity's IPs. Reads pods from the shared ClusterState.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Set

from agent.model.objects import IPAddress, Pod, labels_from_dict
from agent.policy.graph.rules import identity_id
from agent.policy.state import ClusterState, takes_part_in_selectors


def pod_identity(pod: Pod | None) -> int | None:
    """The identity of a pod that takes part in selectors; None for others and for no pod."""
    if pod is None or not takes_part_in_selectors(pod):
        return None
    return identity_id(pod.namespace, labels_from_dict(pod.labels))


class IdentityIndex:
    def __init__(self, state: ClusterState) -> None:
        self._state = state
        self.of_pod: dict[str, int] = {}
        self.pods: dict[int, set[str]] = defaultdict(set)
        self._info: dict[int, tuple[str, dict[str, str]]] = {}
        self._by_namespace: dict[str, set[int]] = defaultdict(set)
        self._ips_cache: dict[int, tuple[IPAddress, ...]] = {}

    def add_member(self, pod_key: str, identity: int) -> bool:
        """Puts the pod in `identity`; True if it is the identity's first pod (call `register`)."""
        self.of_pod[pod_key] = identity
        members = self.pods[identity]
        members.add(pod_key)
        self._ips_cache.pop(identity, None)
        return len(members) == 1

    def register(self, identity: int, pod: Pod) -> None:
        """Records a new identity's namespace and labels (from its first pod)."""
        self._info[identity] = (pod.namespace, dict(pod.labels))
        self._by_namespace[pod.namespace].add(identity)

    def remove_member(self, pod_key: str, identity: int) -> str | None:
        """Takes the pod out of `identity`; the identity's namespace if it has vanished, else None."""
        del self.of_pod[pod_key]
        members = self.pods[identity]
        members.discard(pod_key)
        self._ips_cache.pop(identity, None)
        if members:
            return None
        del self.pods[identity]
        namespace, _ = self._info.pop(identity)
        self._by_namespace[namespace].discard(identity)
        return namespace

    def namespace(self, identity: int) -> str:
        return self._info[identity][0]

    def labels(self, identity: int) -> dict[str, str]:
        return self._info[identity][1]

    def in_namespace(self, namespace: str) -> Set[int]:
        return self._by_namespace.get(namespace, set())

    def ips(self, identity: int) -> tuple[IPAddress, ...]:
        ips = self._ips_cache.get(identity)
        if ips is None:
            found = {ip for key in self.pods.get(identity, ()) for ip in self._state.pods[key].ips}
            ips = tuple(sorted(found, key=lambda ip: (ip.version, int(ip))))
            self._ips_cache[identity] = ips
        return ips

    def forget_ips(self, identity: int) -> None:
        self._ips_cache.pop(identity, None)
