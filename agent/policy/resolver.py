"""Incremental resolver: cluster objects in, one NodePolicy per node out (no I/O).

It is a small calculation graph, in the spirit of Calico Felix's calc graph:

  pods ──► identities (namespace, labels) ──► peer-selector matches ──► policy templates ─┐
  policies ──► selected pods ──────────────────────────────────────────────────────────────┴► endpoints
  endpoints ──► NodePolicy per node

Each stage keeps an index so one event touches only what depends on it:
- a pod event moves the pod between identities; only a *new or vanished* identity is matched
  against the peer selectors whose namespace scope includes the pod's namespace;
- a namespace relabel re-evaluates only the namespace selectors in use;
- a policy template (the policy's allow entries with peers resolved) is recomputed only when the
  policy or one of its peer-selector match sets changed, and marks its selected endpoints dirty
  only when the template really differs;
- an endpoint's allow list is memoised by (its policies' template versions, its named ports), so
  pods with the same policies share one computation;
- node_policy() recomputes only that node's dirty endpoints.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from agent.model.objects import (
    IPAddress,
    IPBlock,
    KubeObject,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    Protocol,
    Rule,
    labels_from_dict,
)
from agent.policy.compiled import (
    IPV4_ALL,
    IPV6_ALL,
    PORT_MAX,
    PORT_MIN,
    PROTOCOL_ANY,
    AllowEntry,
    CidrRef,
    DirectionAllows,
    EndpointPolicy,
    IdentityRef,
    NodePolicy,
    PeerRef,
    normalize_allows,
)
from agent.policy.state import ClusterState, effective_namespace_labels, is_live, takes_part_in_selectors

KIND_NAMESPACE, KIND_POD, KIND_POLICY = "Namespace", "Pod", "NetworkPolicy"

# (own namespace or None, namespace selector or None, pod selector or None): one peer's selectors.
# Exactly one of the first two is set: no namespaceSelector means "the policy's own namespace".
SelectorKey = tuple[str | None, LabelSelector | None, LabelSelector | None]

# Endpoint memo entries are cheap to rebuild; the cap only bounds memory after long churn.
_MEMO_LIMIT = 20_000


def identity_id(namespace: str, labels: Labels) -> int:
    """Stable 64-bit id of (namespace, label set): the same in every process and replica, never 0."""
    canonical = json.dumps([namespace, [list(kv) for kv in labels]], separators=(",", ":"))
    value = int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big")
    return value or 1


@functools.lru_cache(maxsize=1 << 16)
def host_network(ip: IPAddress) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The single-address network of `ip` (/32 or /128); cached, as building one parses text."""
    return ipaddress.ip_network(ip)


def port_ranges(rule: Rule) -> tuple[tuple[int, int, int], ...]:
    """The numeric (protocol, first, last) ranges of a rule; no ports = every protocol and port."""
    if not rule.ports:
        return ((PROTOCOL_ANY, PORT_MIN, PORT_MAX),)
    ranges: list[tuple[int, int, int]] = []
    for spec in rule.ports:
        if spec.port is None:
            ranges.append((spec.protocol.number, PORT_MIN, PORT_MAX))
        elif isinstance(spec.port, int):
            last = spec.end_port if spec.end_port is not None else spec.port
            ranges.append((spec.protocol.number, spec.port, last))
    return tuple(ranges)


def named_ports(rule: Rule) -> tuple[tuple[str, Protocol], ...]:
    return tuple((spec.port, spec.protocol) for spec in rule.ports if isinstance(spec.port, str))


def selector_key(policy: NetworkPolicy, peer: Peer) -> SelectorKey:
    if peer.namespace_selector is None:
        return (policy.namespace, None, peer.pod_selector)
    return (None, peer.namespace_selector, peer.pod_selector)


def policy_selector_keys(policy: NetworkPolicy) -> set[SelectorKey]:
    return {
        selector_key(policy, peer)
        for rule in (*policy.ingress, *policy.egress)
        for peer in rule.peers
        if peer.ip_block is None
    }


@dataclass(frozen=True)
class _NamedEgressDeps:
    """What a policy's named egress ports depend on: pods with these port names that match these
    selectors, or (for ipBlock and peer-less rules) any pod with these port names."""

    names: frozenset[tuple[str, Protocol]]
    selectors: frozenset[SelectorKey]
    any_pod: bool


def named_egress_deps(policy: NetworkPolicy) -> _NamedEgressDeps | None:
    if PolicyType.EGRESS not in policy.policy_types:
        return None
    names: set[tuple[str, Protocol]] = set()
    selectors: set[SelectorKey] = set()
    any_pod = False
    for rule in policy.egress:
        rule_names = named_ports(rule)
        if not rule_names:
            continue
        names.update(rule_names)
        any_pod = any_pod or not rule.peers or any(p.ip_block is not None for p in rule.peers)
        selectors.update(selector_key(policy, p) for p in rule.peers if p.ip_block is None)
    if not names:
        return None
    return _NamedEgressDeps(frozenset(names), frozenset(selectors), any_pod)


# Where one selector's identities land in a policy's template: (is ingress, numeric port ranges)
# per rule that names it. None = some rule pairs it with named ports; recompute the template.
_Slots = tuple[tuple[bool, tuple[tuple[int, int, int], ...]], ...]


def patch_plan(policy: NetworkPolicy) -> dict[SelectorKey, _Slots | None]:
    slots: dict[SelectorKey, list[tuple[bool, tuple[tuple[int, int, int], ...]]]] = defaultdict(list)
    with_named: set[SelectorKey] = set()
    for is_ingress, policy_type, rules in (
        (True, PolicyType.INGRESS, policy.ingress),
        (False, PolicyType.EGRESS, policy.egress),
    ):
        if policy_type not in policy.policy_types:
            continue
        for rule in rules:
            for peer in rule.peers:
                if peer.ip_block is not None:
                    continue
                sel = selector_key(policy, peer)
                slots[sel].append((is_ingress, port_ranges(rule)))
                if named_ports(rule):
                    with_named.add(sel)
    return {sel: None if sel in with_named else tuple(s) for sel, s in slots.items()}


def _named_port_inputs(pod: Pod) -> tuple[object, ...]:
    """The parts of a pod that named egress ports resolve from."""
    return (pod.ips, pod.ports, pod.labels, pod.host_network)


def is_endpoint(pod: Pod) -> bool:
    return is_live(pod) and pod.node_name is not None and not pod.host_network and bool(pod.ips)


@functools.lru_cache(maxsize=1 << 17)
def _identity_ref(identity: int) -> IdentityRef:
    """Shared IdentityRef objects: a wide selector puts the same identities in many templates."""
    return IdentityRef(identity)


def _union(parts: list[tuple[AllowEntry, ...]]) -> tuple[AllowEntry, ...]:
    """Normalised union of normalised allow lists; a single non-empty one is reused as is (the
    common case: one policy selects the pod)."""
    non_empty = [part for part in parts if part]
    if not non_empty:
        return ()
    if len(non_empty) == 1:
        return non_empty[0]
    return normalize_allows(entry for part in non_empty for entry in part)


@dataclass(frozen=True)
class _NamedIngress:
    """An ingress named port, resolved later against each selected pod's own container ports."""

    peers: tuple[PeerRef, ...]
    name: str
    protocol: Protocol


@dataclass(frozen=True)
class _Template:
    """One policy with its peers resolved; independent of which pod it is applied to."""

    ingress_entries: tuple[AllowEntry, ...]
    ingress_named: tuple[_NamedIngress, ...]
    egress_entries: tuple[AllowEntry, ...]


class Resolver:
    """Holds the cluster state and the compiled per-node policy, updated one event at a time."""

    def __init__(self) -> None:
        self._state = ClusterState()
        # identities
        self._pod_identity: dict[str, int] = {}
        self._identity_pods: dict[int, set[str]] = defaultdict(set)
        self._identity_info: dict[int, tuple[str, dict[str, str]]] = {}
        self._ns_identities: dict[str, set[int]] = defaultdict(set)
        self._identity_ips_cache: dict[int, tuple[IPAddress, ...]] = {}
        # peer selectors
        self._sel_matches: dict[SelectorKey, set[int]] = {}
        self._sel_users: dict[SelectorKey, set[str]] = defaultdict(set)
        self._ns_sel_matches: dict[LabelSelector, set[str]] = {}
        self._ns_sel_keys: dict[LabelSelector, set[SelectorKey]] = defaultdict(set)
        self._scope_index: dict[str, set[SelectorKey]] = defaultdict(set)  # namespace -> keys in scope
        # policies
        self._selected: dict[str, set[str]] = {}
        self._selecting: dict[str, set[str]] = defaultdict(set)
        self._ns_policies: dict[str, set[str]] = defaultdict(set)
        self._templates: dict[str, _Template] = {}
        self._template_version: dict[str, int] = {}
        self._version_counter = 0
        self._dirty_templates: set[str] = set()
        self._patch_plans: dict[str, dict[SelectorKey, _Slots | None]] = {}
        self._named_egress: dict[str, _NamedEgressDeps] = {}
        self._named_egress_any_by_name: dict[tuple[str, Protocol], set[str]] = defaultdict(set)
        self._named_egress_by_selector: dict[SelectorKey, set[str]] = defaultdict(set)
        self._named_port_pods: dict[tuple[str, Protocol], set[str]] = defaultdict(set)
        # endpoints and nodes
        self._node_members: dict[str, set[str]] = defaultdict(set)
        self._dirty_endpoints: dict[str, set[str]] = defaultdict(set)
        self._dirty_nodes: set[str] = set()
        self._node_cache: dict[str, NodePolicy] = {}
        self._endpoint_cache: dict[str, dict[str, EndpointPolicy]] = defaultdict(dict)
        self._endpoint_identities: dict[str, dict[str, frozenset[int]]] = defaultdict(dict)
        # identity -> how many of the node's endpoints reference it; the table holds those with a count
        self._node_identity_refs: dict[str, Counter[int]] = defaultdict(Counter)
        self._stale_identities: dict[str, set[int]] = defaultdict(set)  # referenced, IPs changed since
        self._memo: dict[tuple[object, ...], tuple[DirectionAllows, frozenset[int]]] = {}
        self._memo_keys_by_policy: dict[str, set[tuple[object, ...]]] = defaultdict(set)
        self._node_identity_table: dict[str, dict[int, tuple[IPAddress, ...]]] = defaultdict(dict)
        self._node_identities_snapshot: dict[str, dict[int, tuple[IPAddress, ...]]] = {}
        self._known_namespaces: set[str] = set()  # with an object or a pod; ns selectors evaluated

    # ---- public API -------------------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._state

    def upsert(self, obj: KubeObject) -> None:
        if isinstance(obj, Namespace):
            self._put_namespace(obj.name, obj)
        elif isinstance(obj, Pod):
            # A pod that turns Succeeded/Failed leaves every index here as a deletion would.
            self._put_pod(obj.key, obj if is_live(obj) else None)
        else:
            self._put_policy(obj.key, obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        if kind == KIND_NAMESPACE:
            self._put_namespace(name, None)
        elif kind == KIND_POD:
            self._put_pod(f"{namespace}/{name}", None)
        elif kind == KIND_POLICY:
            self._put_policy(f"{namespace}/{name}", None)
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def replace_all(self, objs: Iterable[KubeObject]) -> None:
        """Resync to exactly `objs`; unchanged objects cause no work and no dirtiness."""
        fresh = ClusterState.from_objects(list(objs))
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
        return {node for node, members in self._node_members.items() if members}

    def take_dirty_nodes(self) -> set[str]:
        self._flush_templates()
        dirty, self._dirty_nodes = self._dirty_nodes, set()
        return dirty

    def node_policy(self, node: str) -> NodePolicy:
        self._flush_templates()
        cached = self._node_cache.get(node)
        if cached is not None:
            return cached
        endpoints = self._endpoint_cache[node]
        endpoint_identities = self._endpoint_identities[node]
        refs = self._node_identity_refs[node]
        table = self._node_identity_table[node]
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
            for identity in new_identities - old_identities:
                refs[identity] += 1
                if refs[identity] == 1:
                    table[identity] = self._identity_ips(identity)
                    changed_ips = True
        for identity in self._stale_identities.pop(node, set()):
            if identity in table:
                table[identity] = self._identity_ips(identity)
                changed_ips = True
        # The identity table is the big part (every identity the node's allow lists name); copy it
        # only when it changed, otherwise the new snapshot shares the previous, equal one.
        previous = self._node_identities_snapshot.get(node)
        if previous is None or changed_ips:
            previous = self._node_identities_snapshot[node] = dict(table)
        policy = NodePolicy(endpoints=dict(endpoints), identities=previous)
        self._node_cache[node] = policy
        return policy

    # ---- namespaces ------------------------------------------------------------------------

    def _put_namespace(self, name: str, ns: Namespace | None) -> None:
        old = self._state.namespaces.get(name)
        if old == ns:
            return
        self._ensure_known_namespace(name)
        if ns is None:
            del self._state.namespaces[name]
        else:
            self._state.namespaces[name] = ns
        old_labels = effective_namespace_labels(name, old)
        new_labels = effective_namespace_labels(name, ns)
        if old_labels == new_labels:
            return
        for ns_selector, matching in self._ns_sel_matches.items():
            was, now = name in matching, ns_selector.matches(new_labels)
            if was == now:
                continue
            if now:
                matching.add(name)
            else:
                matching.discard(name)
            for key in self._ns_sel_keys[ns_selector]:
                self._scope_changed(key, name, now)

    def _ensure_known_namespace(self, name: str) -> None:
        """Evaluates every namespace selector in use against a namespace seen for the first time."""
        if name in self._known_namespaces:
            return
        self._known_namespaces.add(name)
        labels = self._state.namespace_labels(name)
        for ns_selector, matching in self._ns_sel_matches.items():
            if ns_selector.matches(labels):
                matching.add(name)
                for key in self._ns_sel_keys[ns_selector]:
                    self._scope_changed(key, name, True)

    def _scope_changed(self, key: SelectorKey, namespace: str, in_scope: bool) -> None:
        """Namespace `namespace` entered or left the scope of selector `key`."""
        matches = self._sel_matches[key]
        pod_selector = key[2]
        if in_scope:
            self._scope_index[namespace].add(key)
            found = {
                i
                for i in self._ns_identities.get(namespace, ())
                if pod_selector is None or pod_selector.matches(self._identity_info[i][1])
            }
            added = found - matches
            matches |= added
            if added:
                self._selector_changed(key, added, set())
        else:
            self._scope_index[namespace].discard(key)
            gone = matches & self._ns_identities.get(namespace, set())
            matches -= gone
            if gone:
                self._selector_changed(key, set(), gone)

    # ---- pods and identities ---------------------------------------------------------------

    def _put_pod(self, key: str, pod: Pod | None) -> None:
        old = self._state.pods.get(key)
        if old == pod:
            return
        if pod is None:
            del self._state.pods[key]
        else:
            self._state.pods[key] = pod

        old_identity = self._pod_identity.get(key)
        new_identity = (
            identity_id(pod.namespace, labels_from_dict(pod.labels))
            if pod is not None and takes_part_in_selectors(pod)
            else None
        )
        if old_identity != new_identity:
            if old_identity is not None:
                self._leave_identity(key, old_identity)
            if new_identity is not None and pod is not None:
                self._join_identity(key, new_identity, pod)
        elif new_identity is not None and old is not None and pod is not None and old.ips != pod.ips:
            self._identity_ips_changed(new_identity)

        self._reindex_named_ports(key, old, pod)
        if self._named_egress:
            self._dirty_named_egress(old, pod, {i for i in (old_identity, new_identity) if i is not None})

        if old is None or pod is None or old.labels != pod.labels or old.host_network != pod.host_network:
            self._reselect(key, pod)
        for node in {p.node_name for p in (old, pod) if p is not None and p.node_name is not None}:
            self._mark_endpoint(node, key)
        if old is not None and old.node_name is not None:
            self._node_members[old.node_name].discard(key)
        if pod is not None and is_endpoint(pod) and pod.node_name is not None:
            self._node_members[pod.node_name].add(key)

    def _dirty_named_egress(self, old: Pod | None, pod: Pod | None, identities: set[int]) -> None:
        """Marks the templates whose named egress ports may resolve differently after this pod event:
        those with a peer-less or ipBlock rule naming one of the pod's ports, and those with a
        selector that matches the pod's (old or new) identity."""
        if old is not None and pod is not None and _named_port_inputs(old) == _named_port_inputs(pod):
            return
        names = {
            (p.name, p.protocol)
            for source in (old, pod)
            if source is not None
            for p in source.ports
            if p.name
        }
        if not names:
            return
        for name in names:
            self._dirty_templates |= self._named_egress_any_by_name.get(name, set())
        namespace = (pod or old).namespace  # type: ignore[union-attr]
        for sel in self._scope_index.get(namespace, ()):
            users = self._named_egress_by_selector.get(sel)
            if users and not identities.isdisjoint(self._sel_matches[sel]):
                self._dirty_templates.update(
                    k for k in users if not names.isdisjoint(self._named_egress[k].names)
                )

    def _reindex_named_ports(self, key: str, old: Pod | None, pod: Pod | None) -> None:
        for source, add in ((old, False), (pod, True)):
            if source is None:
                continue
            for port in source.ports:
                if port.name is None:
                    continue
                pods = self._named_port_pods[(port.name, port.protocol)]
                if add:
                    pods.add(key)
                else:
                    pods.discard(key)

    def _join_identity(self, key: str, identity: int, pod: Pod) -> None:
        self._pod_identity[key] = identity
        members = self._identity_pods[identity]
        members.add(key)
        self._identity_ips_cache.pop(identity, None)
        if len(members) > 1:
            self._identity_ips_changed(identity)
            return
        self._ensure_known_namespace(pod.namespace)
        self._identity_info[identity] = (pod.namespace, dict(pod.labels))
        self._ns_identities[pod.namespace].add(identity)
        for sel in self._scope_index.get(pod.namespace, ()):
            if sel[2] is None or sel[2].matches(pod.labels):
                self._sel_matches[sel].add(identity)
                self._selector_changed(sel, {identity}, set())

    def _leave_identity(self, key: str, identity: int) -> None:
        del self._pod_identity[key]
        members = self._identity_pods[identity]
        members.discard(key)
        self._identity_ips_cache.pop(identity, None)
        if members:
            self._identity_ips_changed(identity)
            return
        del self._identity_pods[identity]
        namespace, _ = self._identity_info.pop(identity)
        self._ns_identities[namespace].discard(identity)
        for sel in self._scope_index.get(namespace, ()):
            matches = self._sel_matches[sel]
            if identity in matches:
                matches.discard(identity)
                self._selector_changed(sel, set(), {identity})
        self._identity_ips_changed(identity)

    def _identity_ips(self, identity: int) -> tuple[IPAddress, ...]:
        ips = self._identity_ips_cache.get(identity)
        if ips is None:
            found = {ip for key in self._identity_pods.get(identity, ()) for ip in self._state.pods[key].ips}
            ips = tuple(sorted(found, key=lambda ip: (ip.version, int(ip))))
            self._identity_ips_cache[identity] = ips
        return ips

    def _identity_ips_changed(self, identity: int) -> None:
        """Nodes whose last NodePolicy listed this identity must rebuild their identity table."""
        self._identity_ips_cache.pop(identity, None)
        for node, refs in self._node_identity_refs.items():
            if refs.get(identity, 0) > 0:
                self._stale_identities[node].add(identity)
                self._dirty_nodes.add(node)
                self._node_cache.pop(node, None)

    # ---- policies --------------------------------------------------------------------------

    def _reselect(self, pod_key: str, pod: Pod | None) -> None:
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

    def _put_policy(self, key: str, policy: NetworkPolicy | None) -> None:
        old = self._state.policies.get(key)
        if old == policy:
            return
        old_selected = self._selected.get(key, set())
        if old is not None:
            del self._state.policies[key]
            self._ns_policies[old.namespace].discard(key)
            for sel in policy_selector_keys(old):
                self._release_selector(sel, key)
            for pod_key in old_selected:
                self._selecting[pod_key].discard(key)
                if not self._selecting[pod_key]:
                    del self._selecting[pod_key]
            self._selected.pop(key, None)
            self._templates.pop(key, None)
            self._template_version.pop(key, None)
            self._patch_plans.pop(key, None)
            self._forget(key)
            deps = self._named_egress.pop(key, None)
            if deps is not None:
                self._index_named_egress(key, deps, add=False)
            self._dirty_templates.discard(key)
        new_selected: set[str] = set()
        if policy is not None:
            self._state.policies[key] = policy
            self._ns_policies[policy.namespace].add(key)
            for sel in policy_selector_keys(policy):
                self._acquire_selector(sel, key)
            new_selected = {
                pod_key
                for identity in self._ns_identities.get(policy.namespace, ())
                if policy.pod_selector.matches(self._identity_info[identity][1])
                for pod_key in self._identity_pods[identity]
            }
            self._selected[key] = new_selected
            for pod_key in new_selected:
                self._selecting[pod_key].add(key)
            deps = named_egress_deps(policy)
            if deps is not None:
                self._named_egress[key] = deps
                self._index_named_egress(key, deps, add=True)
            self._templates[key] = self._compute_template(policy)
            self._template_version[key] = self._next_version()
            self._patch_plans[key] = patch_plan(policy)
            self._dirty_templates.discard(key)
        for pod_key in old_selected | new_selected:
            self._mark_pod_endpoint(pod_key)

    def _index_named_egress(self, policy_key: str, deps: _NamedEgressDeps, add: bool) -> None:
        indexes: list[set[str]] = [self._named_egress_by_selector[sel] for sel in deps.selectors]
        if deps.any_pod:
            indexes.extend(self._named_egress_any_by_name[name] for name in deps.names)
        for index in indexes:
            if add:
                index.add(policy_key)
            else:
                index.discard(policy_key)

    def _acquire_selector(self, sel: SelectorKey, policy_key: str) -> None:
        users = self._sel_users[sel]
        users.add(policy_key)
        if sel in self._sel_matches:
            return
        own_namespace, ns_selector, _ = sel
        self._sel_matches[sel] = set()
        if ns_selector is None:
            assert own_namespace is not None
            scope = {own_namespace}
        else:
            if ns_selector not in self._ns_sel_matches:
                self._ns_sel_matches[ns_selector] = {
                    n for n in self._known_namespaces if ns_selector.matches(self._state.namespace_labels(n))
                }
            self._ns_sel_keys[ns_selector].add(sel)
            scope = self._ns_sel_matches[ns_selector]
        for namespace in scope:
            self._scope_changed(sel, namespace, True)

    def _release_selector(self, sel: SelectorKey, policy_key: str) -> None:
        users = self._sel_users[sel]
        users.discard(policy_key)
        if users:
            return
        del self._sel_users[sel]
        del self._sel_matches[sel]
        own_namespace, ns_selector, _ = sel
        if ns_selector is None:
            assert own_namespace is not None
            self._scope_index[own_namespace].discard(sel)
            return
        for namespace in self._ns_sel_matches[ns_selector]:
            self._scope_index[namespace].discard(sel)
        keys = self._ns_sel_keys[ns_selector]
        keys.discard(sel)
        if not keys:
            del self._ns_sel_keys[ns_selector]
            del self._ns_sel_matches[ns_selector]

    def _selector_changed(self, sel: SelectorKey, added: set[int], removed: set[int]) -> None:
        """Identities joined or left selector `sel`: patch the templates that use it in place (a wide
        selector is shared by many policies, and rebuilding each from scratch is what made one
        new identity cost a full recompute of every policy using it), or queue a recompute."""
        for policy_key in self._sel_users.get(sel, ()):
            template = self._templates.get(policy_key)
            if template is None or policy_key in self._dirty_templates:
                continue  # being built, or about to be rebuilt from the current matches anyway
            plan = self._patch_plans[policy_key]
            slots = plan.get(sel, ())
            if slots is None or (
                removed
                and any(i in self._sel_matches[other] for other in plan if other != sel for i in removed)
            ):
                self._dirty_templates.add(policy_key)
                continue
            if not slots:
                continue  # the selector is only in rules of a direction the policy does not enforce
            patched = _Template(
                self._patched(
                    template.ingress_entries, policy_key, [r for i, r in slots if i], added, removed
                ),
                template.ingress_named,
                self._patched(
                    template.egress_entries, policy_key, [r for i, r in slots if not i], added, removed
                ),
            )
            self._set_template(policy_key, patched)

    @staticmethod
    def _patched(
        entries: tuple[AllowEntry, ...],
        policy_key: str,
        slot_ranges: list[tuple[tuple[int, int, int], ...]],
        added: set[int],
        removed: set[int],
    ) -> tuple[AllowEntry, ...]:
        if not slot_ranges:
            return entries
        if removed:
            entries = tuple(
                e for e in entries if not (isinstance(e.peer, IdentityRef) and e.peer.identity in removed)
            )
        if added:
            fresh = [
                AllowEntry(_identity_ref(identity), protocol, first, last, policy_key)
                for identity in added
                for ranges in slot_ranges
                for protocol, first, last in ranges
            ]
            entries = normalize_allows([*entries, *fresh])
        return entries

    def _set_template(self, policy_key: str, template: _Template) -> None:
        """Installs a changed template; its selected endpoints must recompile."""
        if template == self._templates.get(policy_key):
            return
        self._templates[policy_key] = template
        self._template_version[policy_key] = self._next_version()
        self._forget(policy_key)
        for pod_key in self._selected.get(policy_key, ()):
            self._mark_pod_endpoint(pod_key)

    def _next_version(self) -> int:
        self._version_counter += 1
        return self._version_counter

    def _flush_templates(self) -> None:
        """Recomputes templates whose inputs changed; dirties endpoints only on a real difference."""
        while self._dirty_templates:
            key = self._dirty_templates.pop()
            policy = self._state.policies.get(key)
            if policy is None:
                continue
            self._set_template(key, self._compute_template(policy))

    # ---- compilation ------------------------------------------------------------------------

    def _peer_refs(self, policy: NetworkPolicy, rule: Rule) -> tuple[PeerRef, ...]:
        if not rule.peers:
            return (CidrRef(IPV4_ALL), CidrRef(IPV6_ALL))
        refs: list[PeerRef] = []
        for peer in rule.peers:
            if peer.ip_block is not None:
                refs.append(CidrRef(peer.ip_block.cidr, peer.ip_block.excepts))
            else:
                matches = self._sel_matches[selector_key(policy, peer)]
                refs.extend(_identity_ref(i) for i in sorted(matches))
        return tuple(refs)

    def _named_port_destinations(
        self, policy: NetworkPolicy, rule: Rule, name: str, protocol: Protocol
    ) -> set[tuple[IPAddress, int]]:
        """(pod IP, numeric port) of every pod a named egress port resolves to for this rule."""
        found: set[tuple[IPAddress, int]] = set()

        def add(pod: Pod, ip_filter: IPBlock | None) -> None:
            port = pod.named_port(name, protocol)
            if port is None or not takes_part_in_selectors(pod):
                return
            found.update((ip, port) for ip in pod.ips if ip_filter is None or ip_filter.contains(ip))

        with_name = self._named_port_pods.get((name, protocol), set())
        if not rule.peers:
            for pod_key in with_name:
                add(self._state.pods[pod_key], None)
        for peer in rule.peers:
            if peer.ip_block is not None:
                for pod_key in with_name:
                    add(self._state.pods[pod_key], peer.ip_block)
                continue
            for identity in self._sel_matches[selector_key(policy, peer)]:
                for pod_key in self._identity_pods[identity]:
                    if pod_key in with_name:
                        add(self._state.pods[pod_key], None)
        return found

    def _compute_template(self, policy: NetworkPolicy) -> _Template:
        ingress_entries: list[AllowEntry] = []
        ingress_named: list[_NamedIngress] = []
        egress_entries: list[AllowEntry] = []
        key = policy.key
        if PolicyType.INGRESS in policy.policy_types:
            for rule in policy.ingress:
                peers = self._peer_refs(policy, rule)
                for protocol, first, last in port_ranges(rule):
                    ingress_entries.extend(AllowEntry(p, protocol, first, last, key) for p in peers)
                ingress_named.extend(_NamedIngress(peers, name, proto) for name, proto in named_ports(rule))
        if PolicyType.EGRESS in policy.policy_types:
            for rule in policy.egress:
                peers = self._peer_refs(policy, rule)
                for protocol, first, last in port_ranges(rule):
                    egress_entries.extend(AllowEntry(p, protocol, first, last, key) for p in peers)
                for name, proto in named_ports(rule):
                    for ip, port in sorted(
                        self._named_port_destinations(policy, rule, name, proto),
                        key=lambda d: (d[0].version, int(d[0]), d[1]),
                    ):
                        peer = CidrRef(host_network(ip))
                        egress_entries.append(AllowEntry(peer, proto.number, port, port, key))
        return _Template(
            normalize_allows(ingress_entries), tuple(ingress_named), normalize_allows(egress_entries)
        )

    def _mark_pod_endpoint(self, pod_key: str) -> None:
        pod = self._state.pods.get(pod_key)
        if pod is not None and pod.node_name is not None:
            self._mark_endpoint(pod.node_name, pod_key)

    def _mark_endpoint(self, node: str, pod_key: str) -> None:
        self._dirty_endpoints[node].add(pod_key)
        self._dirty_nodes.add(node)
        self._node_cache.pop(node, None)

    def _compile_endpoint(self, pod: Pod) -> tuple[EndpointPolicy, frozenset[int]]:
        policy_keys = sorted(self._selecting.get(pod.key, ()))
        versions = tuple((k, self._template_version[k]) for k in policy_keys)
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
                            AllowEntry(p, number, port, port, policy.key) for p in named.peers
                        )
            parts.append(normalize_allows(named_entries))
            allows = DirectionAllows(isolated, _union(parts))
            ingress = self._remember(ingress_key, policy_keys, allows)
        egress_key = ("egress", versions)
        egress = self._memo.get(egress_key)
        if egress is None:
            isolated = any(PolicyType.EGRESS in p.policy_types for p in policies)
            allows = DirectionAllows(isolated, _union([t.egress_entries for t in templates]))
            egress = self._remember(egress_key, policy_keys, allows)
        endpoint = EndpointPolicy(pod.namespace, pod.name, pod.ips, ingress[0], egress[0])
        return endpoint, ingress[1] | egress[1]

    def _remember(
        self, key: tuple[object, ...], policy_keys: list[str], allows: DirectionAllows
    ) -> tuple[DirectionAllows, frozenset[int]]:
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
            self._memo_keys_by_policy.clear()
        value = (allows, allows.identities)
        self._memo[key] = value
        for policy_key in policy_keys:
            self._memo_keys_by_policy[policy_key].add(key)
        return value

    def _forget(self, policy_key: str) -> None:
        """Drops memoised allow lists built from an outdated template of `policy_key`."""
        for key in self._memo_keys_by_policy.pop(policy_key, ()):
            self._memo.pop(key, None)
