"""Per-node output: the NodePolicy of each node, rebuilt only for its dirty endpoints.

Holds which endpoints live on which node, which of them must recompile, and the node's identity
table (IP list of every identity its endpoints' allow lists name, reference-counted). An identity
whose IPs change dirties only the nodes that list it. A NodePolicy is cached until the node is
dirtied again; an unchanged identity table is shared between successive snapshots.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable

from agent.model.objects import IPAddress, Pod
from agent.policy.compiled import EndpointPolicy, NodePolicy
from agent.policy.state import ClusterState, is_live

CompileEndpoint = Callable[[Pod], tuple[EndpointPolicy, frozenset[int]]]
IdentityIps = Callable[[int], tuple[IPAddress, ...]]


def is_endpoint(pod: Pod) -> bool:
    return is_live(pod) and pod.node_name is not None and not pod.host_network and bool(pod.ips)


class NodeOutputs:
    def __init__(
        self, state: ClusterState, compile_endpoint: CompileEndpoint, identity_ips: IdentityIps
    ) -> None:
        self._state = state
        self._compile_endpoint = compile_endpoint
        self._identity_ips = identity_ips
        self._members: dict[str, set[str]] = defaultdict(set)
        self._dirty_endpoints: dict[str, set[str]] = defaultdict(set)
        self._dirty_nodes: set[str] = set()
        self._cache: dict[str, NodePolicy] = {}
        self._endpoints: dict[str, dict[str, EndpointPolicy]] = defaultdict(dict)
        self._endpoint_identities: dict[str, dict[str, frozenset[int]]] = defaultdict(dict)
        # identity -> how many of the node's endpoints reference it; the table holds those with a count
        self._identity_refs: dict[str, Counter[int]] = defaultdict(Counter)
        self._stale_identities: dict[str, set[int]] = defaultdict(set)  # referenced, IPs changed since
        self._identity_table: dict[str, dict[int, tuple[IPAddress, ...]]] = defaultdict(dict)
        self._identities_snapshot: dict[str, dict[int, tuple[IPAddress, ...]]] = {}

    def nodes(self) -> set[str]:
        return {node for node, members in self._members.items() if members}

    def take_dirty(self) -> set[str]:
        dirty, self._dirty_nodes = self._dirty_nodes, set()
        return dirty

    def pod_moved(self, key: str, old: Pod | None, pod: Pod | None) -> None:
        """Marks the pod's endpoint on its old and new node and moves its node membership."""
        for node in {p.node_name for p in (old, pod) if p is not None and p.node_name is not None}:
            self.mark_endpoint(node, key)
        if old is not None and old.node_name is not None:
            self._members[old.node_name].discard(key)
        if pod is not None and is_endpoint(pod) and pod.node_name is not None:
            self._members[pod.node_name].add(key)

    def mark_pod(self, pod_key: str) -> None:
        """The pod's endpoint (if it has a node) must recompile."""
        pod = self._state.pods.get(pod_key)
        if pod is not None and pod.node_name is not None:
            self.mark_endpoint(pod.node_name, pod_key)

    def mark_endpoint(self, node: str, pod_key: str) -> None:
        self._dirty_endpoints[node].add(pod_key)
        self._dirty_nodes.add(node)
        self._cache.pop(node, None)

    def identity_ips_changed(self, identity: int) -> None:
        """Nodes whose last NodePolicy listed this identity must rebuild their identity table."""
        for node, refs in self._identity_refs.items():
            if refs.get(identity, 0) > 0:
                self._stale_identities[node].add(identity)
                self._dirty_nodes.add(node)
                self._cache.pop(node, None)

    def node_policy(self, node: str) -> NodePolicy:
        cached = self._cache.get(node)
        if cached is not None:
            return cached
        endpoints = self._endpoints[node]
        endpoint_identities = self._endpoint_identities[node]
        refs = self._identity_refs[node]
        table = self._identity_table[node]
        changed_ips = False
        for key in self._dirty_endpoints.pop(node, set()):
            endpoints.pop(key, None)
            old_identities = endpoint_identities.pop(key, frozenset())
            new_identities: frozenset[int] = frozenset()
            pod = self._state.pods.get(key)
            if pod is not None and is_endpoint(pod) and pod.node_name == node:
                endpoints[key], new_identities = self._compile_endpoint(pod)
                endpoint_identities[key] = new_identities
            for identity in old_identities - new_identities:
                refs[identity] -= 1
                if not refs[identity]:
                    del refs[identity], table[identity]
                    changed_ips = True
            added = new_identities - old_identities
            if added:
                # In C (Counter.update of a set, set.difference of a dict): a front pod's list
                # names thousands of identities, most already in the node's table, and a Python
                # step per identity was 2 s of the 100,000-pod full load.
                refs.update(added)
                for identity in added.difference(table):
                    table[identity] = self._identity_ips(identity)
                    changed_ips = True
        for identity in self._stale_identities.pop(node, set()):
            if identity in table:
                table[identity] = self._identity_ips(identity)
                changed_ips = True
        # The identity table is the big part (every identity the node's allow lists name); copy it
        # only when it changed, otherwise the new snapshot shares the previous, equal one.
        previous = self._identities_snapshot.get(node)
        if previous is None or changed_ips:
            previous = self._identities_snapshot[node] = dict(table)
        policy = NodePolicy(endpoints=dict(endpoints), identities=previous)
        self._cache[node] = policy
        return policy
