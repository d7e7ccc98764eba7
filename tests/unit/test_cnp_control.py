"""ClusterNetworkPolicy in the control service (issue 23).

- The folder source and the Kubernetes source (custom-objects API, replayed) read it; an invalid
  one is reported with its field path like any object.
- It reaches the nodes: the endpoints it selects carry its tiered entries (agent.policy.compiled),
  and `podfence status` lists no valid one as a problem (the dataplanes enforce it).
- A cluster without the CRD (404) is served: the kind counts as listed and empty.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch

from agent.control.hub import PolicyHub
from agent.control.metrics import ControlMetrics
from agent.control.source_folder import FolderSource
from agent.control.source_kubernetes import KubernetesSource, _api_list_functions
from agent.model.load import parse_object
from agent.model.objects import KubeObject
from agent.policy.resolver import Resolver
from tests.unit.control_helpers import PODS, ns_doc, policy_doc


def cnp_doc(name: str, port: int = 15000, priority: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": priority,
            "subject": {"namespaces": {}},
            "ingress": [
                {
                    "name": "no-proxy-admin",
                    "action": "Deny",
                    "from": [{"namespaces": {}}],
                    "protocols": [{"tcp": {"destinationPort": {"number": port}}}],
                }
            ],
        },
    }


def enforced(resolver: Resolver, nodes: tuple[str, ...] = ("n1", "n2", "n3")) -> dict[str, set[int]]:
    """ClusterNetworkPolicy name -> the ports of its tiered entries on the nodes' endpoints."""
    found: dict[str, set[int]] = {}
    for node in nodes:
        for endpoint in resolver.node_policy(node).endpoints.values():
            for entry in (*endpoint.ingress.tiered, *endpoint.egress.tiered):
                found.setdefault(entry.policy, set()).add(entry.port_first)
    return found


def problems(hub: PolicyHub) -> list[str]:
    return [p.object or "" for p in hub.status().source_errors]


def base_hub() -> tuple[PolicyHub, Resolver, ControlMetrics]:
    metrics = ControlMetrics()
    resolver = Resolver()
    hub = PolicyHub(resolver, metrics, initial_version=1)
    with hub.change() as r:
        for doc in (ns_doc("shop"), *PODS, policy_doc("web-in", "web", 8080)):
            r.upsert(parse_object(doc))
    return hub, resolver, metrics


# --- folder ------------------------------------------------------------------------------------


def test_folder_cnp_reaches_the_nodes_and_an_invalid_one_is_reported(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump_all([ns_doc("shop"), *PODS, policy_doc("web-in", "web", 8080)])
    )
    metrics = ControlMetrics()
    resolver = Resolver()
    hub = PolicyHub(resolver, metrics, initial_version=1)
    source = FolderSource(tmp_path, hub)
    source.scan()
    before = {node: resolver.node_policy(node) for node in ("n1", "n2", "n3")}
    assert enforced(resolver) == {} and problems(hub) == []

    bad = cnp_doc("broken")
    bad["spec"]["priority"] = 5000
    (tmp_path / "admin.yaml").write_text(yaml.safe_dump_all([cnp_doc("mesh-guard"), bad]))
    source.scan()
    assert set(resolver.state.cluster_policies) == {"mesh-guard"}
    assert enforced(resolver) == {"mesh-guard": {15000}}
    invalid = [p for p in hub.status().source_errors if p.object == "ClusterNetworkPolicy broken"]
    assert len(invalid) == 1 and "spec.priority" in invalid[0].error
    assert problems(hub) == ["ClusterNetworkPolicy broken"]

    (tmp_path / "admin.yaml").write_text(yaml.safe_dump_all([cnp_doc("mesh-guard", port=15001)]))
    source.scan()
    assert enforced(resolver) == {"mesh-guard": {15001}}

    (tmp_path / "admin.yaml").unlink()
    source.scan()
    assert resolver.state.cluster_policies == {}
    assert {node: resolver.node_policy(node) for node in ("n1", "n2", "n3")} == before


# --- Kubernetes --------------------------------------------------------------------------------


class CustomObjectsApi:
    """Test double of the custom-objects API for one CRD: lists and watches return plain dicts,
    as `list_cluster_custom_object` does; `missing` answers 404 as a cluster without the CRD."""

    def __init__(self, lists: list[tuple[str, list[dict[str, Any]]]], watches: list[list[Any]]) -> None:
        self.lists = list(lists)
        self.watches = list(watches)
        self.missing = False
        self.list_calls = 0

    def list_function(self, **kwargs: Any) -> Any:
        self.list_calls += 1
        if self.missing:
            raise client.exceptions.ApiException(status=404, reason="Not Found")
        version, items = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        return {
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicyList",
            "metadata": {"resourceVersion": version},
            "items": copy.deepcopy(items),
        }

    def watch(self) -> Any:
        api = self

        class _Watch:
            def stream(self, func: Any, **kwargs: Any) -> Any:
                if api.missing:
                    raise client.exceptions.ApiException(status=404, reason="Not Found")
                if not api.watches:
                    return
                for event in api.watches.pop(0):
                    if isinstance(event, Exception):
                        raise event
                    yield copy.deepcopy(event)

            def stop(self) -> None:
                pass

        return _Watch()


def event(kind: str, doc: dict[str, Any], version: str) -> dict[str, Any]:
    raw = copy.deepcopy(doc)
    raw["metadata"]["resourceVersion"] = version
    return {"type": kind, "raw_object": raw, "object": raw}


def k8s_source(hub: PolicyHub, api: CustomObjectsApi) -> KubernetesSource:
    return KubernetesSource(
        hub,
        client.ApiClient(),
        list_functions={"ClusterNetworkPolicy": api.list_function},
        watch_factory=api.watch,
        backoff_initial=0.01,
        backoff_max=0.02,
    )


def test_kubernetes_source_lists_and_watches_cluster_network_policies() -> None:
    hub, resolver, _ = base_hub()
    before = resolver.node_policy("n1")
    invalid = cnp_doc("broken")
    invalid["spec"]["tier"] = "Platform"
    api = CustomObjectsApi(
        lists=[("10", [cnp_doc("mesh-guard")])],
        watches=[
            [
                event("ADDED", cnp_doc("metadata", priority=1), "11"),
                event("MODIFIED", cnp_doc("mesh-guard", port=15001), "12"),
                event("ADDED", invalid, "13"),
                event("DELETED", cnp_doc("metadata", priority=1), "14"),
            ]
        ],
    )
    source = k8s_source(hub, api)
    source.watch_kind("ClusterNetworkPolicy", threading.Event(), max_attempts=1)
    assert source.synced.is_set()
    assert set(resolver.state.cluster_policies) == {"mesh-guard"}
    assert resolver.state.cluster_policies["mesh-guard"].ingress[0].ports[0].first == 15001
    assert source.resource_versions["ClusterNetworkPolicy"] == "14"
    assert resolver.node_policy("n1") != before
    assert enforced(resolver, ("n1",)) == {"mesh-guard": {15001}}
    found = [p for p in hub.status().source_errors if p.source == "kubernetes"]
    assert [p.object for p in found] == ["ClusterNetworkPolicy broken"]
    assert "spec.tier" in found[0].error


def test_kubernetes_source_without_the_crd_is_synced_and_retries() -> None:
    hub, resolver, metrics = base_hub()
    api = CustomObjectsApi(lists=[("20", [cnp_doc("mesh-guard")])], watches=[])
    api.missing = True
    source = k8s_source(hub, api)
    version = hub.version
    source.watch_kind("ClusterNetworkPolicy", threading.Event(), max_attempts=3)
    assert source.synced.is_set(), "agents must be served in a cluster without the CRD"
    assert api.list_calls == 3 and hub.version == version + 1, "one version, not one per retry"
    assert source.last_error is None and metrics.source_errors_total._value.get() == 0
    api.missing = False  # the CRD is installed
    source.watch_kind("ClusterNetworkPolicy", threading.Event(), max_attempts=1)
    assert set(resolver.state.cluster_policies) == {"mesh-guard"}
    api.missing = True  # and removed again: its objects go with it
    source.watch_kind("ClusterNetworkPolicy", threading.Event(), max_attempts=1)
    assert resolver.state.cluster_policies == {} and enforced(resolver) == {}


def test_the_real_list_function_asks_the_custom_objects_api(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(self: Any, group: str, version: str, plural: str, **kwargs: Any) -> Any:
        calls.append((group, version, plural, kwargs))
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    monkeypatch.setattr(client.CustomObjectsApi, "list_cluster_custom_object", fake)
    function = _api_list_functions(client.ApiClient())["ClusterNetworkPolicy"]
    function(watch=True, resource_version="5")
    assert calls == [
        (
            "policy.networking.k8s.io",
            "v1alpha2",
            "clusternetworkpolicies",
            {"watch": True, "resource_version": "5"},
        )
    ]
    # No model type to deserialise into: watch events stay the dicts the source parses.
    assert watch.Watch().get_return_type(function) == ""


# --- resolver ----------------------------------------------------------------------------------


def parsed(doc: dict[str, Any]) -> KubeObject:
    obj = parse_object(doc)
    assert obj is not None
    return obj


def test_the_resolver_compiles_cluster_policies_and_forgets_them() -> None:
    node = parsed({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})
    resolver = Resolver()
    base = [parsed(doc) for doc in (ns_doc("shop"), *PODS, policy_doc("web-in", "web", 8080))]
    resolver.replace_all(base)
    resolver.take_dirty_nodes()
    before = {n: resolver.node_policy(n) for n in ("n1", "n2", "n3")}
    resolver.upsert(parsed(cnp_doc("mesh-guard")))
    resolver.upsert(node)
    assert resolver.take_dirty_nodes() == set(before), "every endpoint may be a subject"
    assert enforced(resolver) == {"mesh-guard": {15000}} and set(resolver.state.nodes) == {"n1"}
    resolver.replace_all([*base, parsed(cnp_doc("other", port=9)), node])
    assert enforced(resolver) == {"other": {9}}
    resolver.delete("ClusterNetworkPolicy", "", "other")
    resolver.delete("Node", "", "n1")
    assert enforced(resolver) == {} and resolver.state.nodes == {}
    assert {n: resolver.node_policy(n) for n in ("n1", "n2", "n3")} == before
