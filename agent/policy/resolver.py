"""Incremental resolver: cluster objects in, one NodePolicy per node out (no I/O).

It is a small calculation graph, in the spirit of Calico Felix's calc graph; each node is a part
in agent.policy.graph and this module is only the dispatcher that feeds events to the parts and
wires their outputs together:

  pods ──► identities (namespace, labels) ──► selectors (peer-selector matches) ──► templates ─┐
  policies ──► selection (selected pods) ─────────────────────────────────────────────────────┴► endpoints
  endpoints ──► nodes (NodePolicy per node)

Each part keeps an index so one event touches only what depends on it:
- a pod event moves the pod between identities; only a *new or vanished* identity is matched
  against the peer selectors whose namespace scope includes the pod's namespace (graph.identities,
  graph.selectors);
- a namespace relabel re-evaluates only the namespace selectors in use (graph.selectors);
- a policy template (the policy's allow entries with peers resolved) is recomputed only when the
  policy or one of its peer-selector match sets changed, or a pod its named egress ports resolve to
  (graph.named_ports), and marks its selected endpoints dirty only when the template really
  differs (graph.templates, graph.selection);
- an endpoint's allow list is memoised by (its policies' template versions, its named ports), so
  pods with the same policies share one computation (graph.endpoints);
- node_policy() recomputes only that node's dirty endpoints (graph.nodes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from agent.model.cluster_policy import ClusterNetworkPolicy, Node
from agent.model.objects import KubeObject, Namespace, NetworkPolicy, Pod, PolicyType
from agent.policy.compiled import EndpointPolicy, NodePolicy
from agent.policy.graph.cluster import ClusterTiers
from agent.policy.graph.endpoints import EndpointCompiler
from agent.policy.graph.identities import IdentityIndex, pod_identity
from agent.policy.graph.named_ports import NamedPortIndex
from agent.policy.graph.nodes import NodeOutputs
from agent.policy.graph.rules import SelectorKey, identity_id, policy_selector_keys
from agent.policy.graph.selection import PolicySelection
from agent.policy.graph.selectors import SelectorIndex
from agent.policy.graph.templates import TemplateStore
from agent.policy.state import ClusterState, effective_namespace_labels, is_live

__all__ = ["Resolver", "identity_id"]

KIND_NAMESPACE, KIND_POD, KIND_POLICY = "Namespace", "Pod", "NetworkPolicy"
KIND_CLUSTER_POLICY, KIND_NODE = "ClusterNetworkPolicy", "Node"


class Resolver:
    """Holds the cluster state and the compiled per-node policy, updated one event at a time."""

    def __init__(self) -> None:
        self._state = state = ClusterState()
        self._identities = IdentityIndex(state)
        self._selectors = SelectorIndex(state, self._identities, self._selector_changed)
        self._selection = PolicySelection(state, self._identities)
        self._named_ports = NamedPortIndex(state, self._identities, self._selectors)
        self._templates = TemplateStore(state, self._selectors, self._named_ports, self._template_changed)
        self._endpoints = EndpointCompiler(state, self._templates)
        self._nodes = NodeOutputs(state, self._compile_endpoint, self._identities.ips)
        self._tiers = ClusterTiers(state, self._identities)

    # ---- public API -------------------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._state

    def upsert(self, obj: KubeObject) -> None:
        if isinstance(obj, NetworkPolicy | ClusterNetworkPolicy) and obj.audit:
            # An audit policy is never enforced (agent.policy.audit): it is as good as absent here,
            # and an enforced policy switched to audit leaves the compiled state.
            kind = KIND_POLICY if isinstance(obj, NetworkPolicy) else KIND_CLUSTER_POLICY
            namespace = obj.namespace if isinstance(obj, NetworkPolicy) else None
            self.delete(kind, namespace, obj.name)
            return
        if isinstance(obj, Namespace):
            self._put_namespace(obj.name, obj)
        elif isinstance(obj, Pod):
            # A pod that turns Succeeded/Failed leaves every index here as a deletion would.
            self._put_pod(obj.key, obj if is_live(obj) else None)
        elif isinstance(obj, ClusterNetworkPolicy):
            if self._state.cluster_policies.get(obj.key) != obj:
                self._state.put(obj)
                self._cluster_changed()
        elif isinstance(obj, Node):
            if self._state.nodes.get(obj.key) != obj:
                self._state.put(obj)
                self._cluster_changed()
        else:
            self._put_policy(obj.key, obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        if kind == KIND_NAMESPACE:
            self._put_namespace(name, None)
        elif kind == KIND_POD:
            self._put_pod(f"{namespace}/{name}", None)
        elif kind == KIND_POLICY:
            self._put_policy(f"{namespace}/{name}", None)
        elif kind == KIND_CLUSTER_POLICY:
            if self._state.cluster_policies.pop(name, None) is not None:
                self._cluster_changed(was_active=True)
        elif kind == KIND_NODE:
            if self._state.nodes.pop(name, None) is not None:
                self._cluster_changed()
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def replace_all(self, objs: Iterable[KubeObject]) -> None:
        """Resync to exactly `objs`; unchanged objects cause no work and no dirtiness."""
        enforced = [o for o in objs if not (isinstance(o, NetworkPolicy | ClusterNetworkPolicy) and o.audit)]
        fresh = ClusterState.from_objects(enforced)
        if (fresh.cluster_policies, fresh.nodes) != (self._state.cluster_policies, self._state.nodes):
            was_active = self._tiers.active
            self._state.cluster_policies = dict(fresh.cluster_policies)
            self._state.nodes = dict(fresh.nodes)
            self._cluster_changed(was_active)
        for key in set(self._state.policies) - set(fresh.policies):
            self._put_policy(key, None)
        for key in set(self._state.pods) - set(fresh.pods):
            self._put_pod(key, None)
        for name in set(self._state.namespaces) - set(fresh.namespaces):
            self._put_namespace(name, None)
        for ns in fresh.namespaces.values():
            self._put_namespace(ns.name, ns)
        for pod in fresh.pods.values():
            self._put_pod(pod.key, pod)
        for policy in fresh.policies.values():
            self._put_policy(policy.key, policy)

    def nodes(self) -> set[str]:
        return self._nodes.nodes()

    def take_dirty_nodes(self) -> set[str]:
        self._templates.flush()
        return self._nodes.take_dirty()

    def node_policy(self, node: str) -> NodePolicy:
        self._templates.flush()
        return self._nodes.node_policy(node)

    # ---- events -----------------------------------------------------------------------------

    def _put_namespace(self, name: str, ns: Namespace | None) -> None:
        old = self._state.namespaces.get(name)
        if old == ns:
            return
        self._selectors.ensure_known_namespace(name)
        if ns is None:
            del self._state.namespaces[name]
        else:
            self._state.namespaces[name] = ns
        new_labels = effective_namespace_labels(name, ns)
        if effective_namespace_labels(name, old) != new_labels:
            self._selectors.namespace_relabelled(name, new_labels)
            self._cluster_changed()

    def _put_pod(self, key: str, pod: Pod | None) -> None:
        old = self._state.pods.get(key)
        if old == pod:
            return
        if pod is None:
            del self._state.pods[key]
        else:
            self._state.pods[key] = pod

        old_identity = self._identities.of_pod.get(key)
        new_identity = pod_identity(pod)
        if old_identity != new_identity:
            if old_identity is not None:
                self._leave_identity(key, old_identity)
            if new_identity is not None and pod is not None:
                self._join_identity(key, new_identity, pod)
        elif new_identity is not None and old is not None and pod is not None and old.ips != pod.ips:
            self._identity_ips_changed(new_identity)

        self._named_ports.reindex_pod(key, old, pod)
        identities = {i for i in (old_identity, new_identity) if i is not None}
        self._templates.mark_dirty(self._named_ports.affected_policies(old, pod, identities))

        if old is None or pod is None or old.labels != pod.labels or old.host_network != pod.host_network:
            self._selection.reselect(key, pod)
        self._nodes.pod_moved(key, old, pod)
        if self._tiers.active and self._tiers.uses_destination_pods():
            self._cluster_changed()

    def _put_policy(self, key: str, policy: NetworkPolicy | None) -> None:
        old = self._state.policies.get(key)
        if old == policy:
            return
        old_selected: set[str] = set()
        if old is not None:
            del self._state.policies[key]
            for sel in policy_selector_keys(old):
                self._selectors.release(sel, key)
            old_selected = self._selection.remove_policy(old)
            self._templates.remove_policy(key)
            self._endpoints.forget(key)
            self._named_ports.remove_policy(key)
        new_selected: set[str] = set()
        if policy is not None:
            self._state.policies[key] = policy
            for sel in policy_selector_keys(policy):
                self._selectors.acquire(sel, key)
            new_selected = self._selection.add_policy(policy)
            self._named_ports.add_policy(policy)
            self._templates.add_policy(policy)
        for pod_key in old_selected | new_selected:
            self._nodes.mark_pod(pod_key)

    # ---- wiring between the parts -----------------------------------------------------------

    def _join_identity(self, key: str, identity: int, pod: Pod) -> None:
        if not self._identities.add_member(key, identity):
            self._identity_ips_changed(identity)
            return
        self._selectors.ensure_known_namespace(pod.namespace)
        self._identities.register(identity, pod)
        self._selectors.identity_appeared(identity, pod)
        if self._tiers.active and self._tiers.matches_some_peer(pod.namespace, pod.labels):
            self._cluster_changed()

    def _leave_identity(self, key: str, identity: int) -> None:
        labels = self._identities.labels(identity)
        namespace = self._identities.remove_member(key, identity)
        if namespace is not None:
            self._selectors.identity_vanished(identity, namespace)
            if self._tiers.active and self._tiers.matches_some_peer(namespace, labels):
                self._cluster_changed()
        self._identity_ips_changed(identity)

    def _identity_ips_changed(self, identity: int) -> None:
        self._identities.forget_ips(identity)
        self._nodes.identity_ips_changed(identity)

    def _selector_changed(self, sel: SelectorKey, added: set[int], removed: set[int]) -> None:
        self._templates.selector_changed(sel, added, removed)

    def _template_changed(self, policy_key: str) -> None:
        """A policy's template really differs: its memoised allow lists and endpoints are stale."""
        self._endpoints.forget(policy_key)
        for pod_key in self._selection.selected(policy_key):
            self._nodes.mark_pod(pod_key)

    def _cluster_changed(self, was_active: bool = False) -> None:
        """Something ClusterNetworkPolicy entries depend on changed: every endpoint recompiles
        (rare events: a ClusterNetworkPolicy, Node, namespace label or identity set changed)."""
        if not (self._tiers.active or was_active):
            return
        self._tiers.changed()
        for pod_key in self._state.pods:
            self._nodes.mark_pod(pod_key)

    def _compile_endpoint(self, pod: Pod) -> tuple[EndpointPolicy, frozenset[int]]:
        endpoint, identities = self._endpoints.compile(pod, self._selection.selecting(pod.key))
        if not self._tiers.active:
            return endpoint, identities
        ingress = self._tiers.attach(pod, PolicyType.INGRESS, endpoint.ingress)
        egress = self._tiers.attach(pod, PolicyType.EGRESS, endpoint.egress)
        if ingress is endpoint.ingress and egress is endpoint.egress:
            return endpoint, identities
        endpoint = replace(endpoint, ingress=ingress, egress=egress)
        # the base lists' identities are in `identities` already; the tiered ones once per list
        return endpoint, identities | self._tiers.identities(ingress) | self._tiers.identities(egress)
