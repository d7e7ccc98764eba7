"""The resolver with audit policies: the enforced view, and the audit view where it differs.

Two incremental resolvers (agent.policy.resolver) judge the two views of agent.policy.audit: the
enforced one sees the objects as they are (a Resolver leaves audit policies out by itself), the
audit one sees every policy switched to enforce. The audit resolver exists only while some policy
is in audit, so a cluster without audit policies pays nothing. A node's policy is the enforced
resolver's, with each endpoint direction's audit view attached where it differs: the enforced
fields are the enforced resolver's own, byte for byte, whatever the audit policies say.

Keeping two whole resolvers costs a second copy of the indexes while audit policies exist; a
view-aware graph would share the pod and identity indexes, but would thread the mode through
every part of it. An audit rollout is a transient state, so the simple form is the one kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from agent.model.cluster_policy import ClusterNetworkPolicy
from agent.model.objects import KubeObject, NetworkPolicy
from agent.policy.audit import as_enforced
from agent.policy.compiled import DirectionAllows, EndpointPolicy, NodePolicy
from agent.policy.resolver import Resolver
from agent.policy.state import ClusterState

CLUSTER_SCOPED = frozenset({"Namespace", "ClusterNetworkPolicy", "Node"})


def _ref(obj: KubeObject) -> tuple[str, str]:
    kind = type(obj).__name__
    return kind, obj.name if kind in CLUSTER_SCOPED else f"{obj.namespace}/{obj.name}"  # type: ignore[union-attr]


def _for_audit(obj: KubeObject) -> KubeObject:
    return as_enforced(obj) if isinstance(obj, NetworkPolicy | ClusterNetworkPolicy) else obj


def _is_audit(obj: KubeObject) -> bool:
    return isinstance(obj, NetworkPolicy | ClusterNetworkPolicy) and obj.audit


def with_audit(enforced: DirectionAllows, audit: DirectionAllows) -> DirectionAllows:
    """`enforced` carrying `audit` as its audit view when the two judge differently."""
    if audit == enforced:
        return enforced
    return replace(enforced, audit=audit)


class StagedResolver:
    """Resolver's public API (agent.control.hub.PolicyResolver), audit views included."""

    def __init__(self) -> None:
        self._enforced = Resolver()
        self._audit: Resolver | None = None
        self._audit_keys: set[tuple[str, str]] = set()  # (kind, key) of the policies in audit
        self._objects: dict[tuple[str, str], KubeObject] = {}  # to seed the audit resolver
        self._dirty_from_audit: set[str] = set()

    @property
    def state(self) -> ClusterState:
        return self._enforced.state

    def objects(self) -> list[KubeObject]:
        """Every object held, audit policies included (`state` is the enforced view)."""
        return list(self._objects.values())

    @property
    def auditing(self) -> bool:
        return self._audit is not None

    def upsert(self, obj: KubeObject) -> None:
        ref = _ref(obj)
        self._objects[ref] = obj
        self._enforced.upsert(obj)
        if _is_audit(obj):
            self._audit_keys.add(ref)
        else:
            self._audit_keys.discard(ref)
        self._sync_audit_resolver(lambda resolver: resolver.upsert(_for_audit(obj)))

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        key = name if kind in CLUSTER_SCOPED else f"{namespace}/{name}"
        self._objects.pop((kind, key), None)
        self._audit_keys.discard((kind, key))
        self._enforced.delete(kind, namespace, name)
        self._sync_audit_resolver(lambda resolver: resolver.delete(kind, namespace, name))

    def replace_all(self, objs: Iterable[KubeObject]) -> None:
        objects = list(objs)
        self._objects = {_ref(o): o for o in objects}
        self._audit_keys = {ref for ref, o in self._objects.items() if _is_audit(o)}
        self._enforced.replace_all(objects)
        self._sync_audit_resolver(lambda resolver: resolver.replace_all([_for_audit(o) for o in objects]))

    def _sync_audit_resolver(self, event: object) -> None:
        """Feeds `event` to the audit resolver, creating it (from every object) when the first
        policy enters audit and dropping it when the last one leaves."""
        if not self._audit_keys:
            if self._audit is not None:
                self._dirty_from_audit |= self._audit.nodes()
                self._audit = None
            return
        if self._audit is None:
            self._audit = Resolver()
            self._audit.replace_all([_for_audit(o) for o in self._objects.values()])
            return
        event(self._audit)  # type: ignore[operator]

    def nodes(self) -> set[str]:
        return self._enforced.nodes()

    def take_dirty_nodes(self) -> set[str]:
        dirty = self._enforced.take_dirty_nodes()
        if self._audit is not None:
            dirty |= self._audit.take_dirty_nodes()
        dirty |= self._dirty_from_audit
        self._dirty_from_audit = set()
        return dirty

    def node_policy(self, node: str) -> NodePolicy:
        enforced = self._enforced.node_policy(node)
        if self._audit is None:
            return enforced
        audit = self._audit.node_policy(node)
        endpoints: dict[str, EndpointPolicy] = {}
        identities = dict(enforced.identities)
        for key, endpoint in enforced.endpoints.items():
            seen = audit.endpoints.get(key)
            if seen is None:  # the same pods in both views; only a race of events could differ
                endpoints[key] = endpoint
                continue
            ingress = with_audit(endpoint.ingress, seen.ingress)
            egress = with_audit(endpoint.egress, seen.egress)
            if ingress is not endpoint.ingress or egress is not endpoint.egress:
                endpoint = replace(endpoint, ingress=ingress, egress=egress)
                for identity in (ingress.identities | egress.identities) - identities.keys():
                    identities[identity] = audit.identities[identity]
            endpoints[key] = endpoint
        return NodePolicy(endpoints=endpoints, identities=identities)
