"""The cluster as the policy layer sees it: namespaces, pods and policies by key.

Shared by the resolver (which keeps one incrementally) and the reference evaluator (which reads
it directly). Also holds the two facts both must agree on: a namespace's effective labels, and
which pods take part in pod-selector matching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.model.objects import KubeObject, Namespace, NetworkPolicy, Pod

# The API server labels every namespace with its own name (since Kubernetes 1.21); selectors in
# the upstream conformance suite rely on it, so it is part of a namespace's effective labels.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def effective_namespace_labels(name: str, namespace: Namespace | None) -> dict[str, str]:
    """Labels a namespaceSelector sees. A namespace without an object (a folder source that omits
    it) is treated as existing with only the automatic name label, as the pods in it prove it exists."""
    labels = dict(namespace.labels) if namespace is not None else {}
    labels[NAMESPACE_NAME_LABEL] = name
    return labels


def is_live(pod: Pod) -> bool:
    """A pod in phase Succeeded or Failed takes no part in policy at all: neither an endpoint nor
    a peer. Its containers are gone and its IPs may already be another pod's (kube-router, Calico,
    Antrea and the AWS agent drop such pods too). A pod with a deletionTimestamp still in another
    phase is live: it runs through its grace period with its IPs, and the kubelet moves it to a
    terminal phase once its containers have stopped (Kubernetes 1.27 and later)."""
    return not pod.terminated


def takes_part_in_selectors(pod: Pod) -> bool:
    """hostNetwork pods share the node's identity: no policy selects them and no pod selector
    matches them (what Kubernetes leaves undefined); they are seen only by their IPs."""
    return not pod.host_network


@dataclass
class ClusterState:
    """Mutable maps by key; the objects themselves are immutable."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)  # key "ns/name"
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)  # key "ns/name"

    @classmethod
    def from_objects(cls, objects: list[KubeObject] | tuple[KubeObject, ...]) -> ClusterState:
        state = cls()
        for obj in objects:
            state.put(obj)
        return state

    def put(self, obj: KubeObject) -> None:
        """Adds or replaces `obj`; a terminated pod removes its key instead (see is_live)."""
        if isinstance(obj, Namespace):
            self.namespaces[obj.name] = obj
        elif isinstance(obj, Pod):
            if is_live(obj):
                self.pods[obj.key] = obj
            else:
                self.pods.pop(obj.key, None)
        else:
            self.policies[obj.key] = obj

    def namespace_labels(self, name: str) -> dict[str, str]:
        return effective_namespace_labels(name, self.namespaces.get(name))

    def pod_by_ip(self) -> dict[str, Pod]:
        """str(ip) -> pod, for turning a bare IP back into the pod that owns it."""
        return {str(ip): pod for pod in self.pods.values() for ip in pod.ips}
