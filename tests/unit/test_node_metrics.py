"""Agent metrics served over HTTP, read live at scrape time from a dataplane test double."""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.dataplane.base import EndpointCounters
from agent.dataplane.types import Endpoint, IPAddress, NodeState
from agent.metrics_http import start_metrics_server
from agent.node.interfaces import HostView, Link
from agent.node.metrics import register_agent_metrics
from agent.node.reconcile import Reconciler

DOCUMENTED = {
    "podfence_endpoint_packets",
    "podfence_endpoint_bytes",
    "podfence_drops",
    "podfence_policy_programming_seconds",
    "podfence_applied_version",
    "podfence_sync_connected",
    "podfence_sync_held",
    "podfence_managed_endpoints",
    "podfence_map_entries",
    "podfence_map_capacity",
    "podfence_events_lost",
    "podfence_apply_errors",
}


class CountingDataplaneDouble:
    """Stands in for the bpf dataplane: counters and map usage are plain attributes."""

    name = "counting-double"

    def __init__(self) -> None:
        self.denied_packets = 0

    def start(self) -> None:
        pass

    def apply(self, state: NodeState) -> None:
        pass

    def counters(self) -> list[EndpointCounters]:
        return [EndpointCounters("ns/a", "ingress", 10, 1000, self.denied_packets, 60 * self.denied_packets)]

    def drop_reason_counts(self) -> Mapping[str, int]:
        return {"policy_denied": self.denied_packets}

    def map_usage(self) -> Mapping[str, tuple[int, int]]:
        return {"policy": (3, 1024)}

    def events_lost(self) -> int:
        return 2

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class OneInterfaceDiscoveryDouble:
    def scan(self) -> HostView:
        return HostView(links={}, node_ips=(), uplinks=frozenset(), pod_interfaces=frozenset({5}))

    def scan_links(self) -> dict[int, Link]:
        return dict(self.scan().links)

    def resolve(self, ip: IPAddress, view: HostView) -> int | None:
        return 5

    def mac_of(self, ifindex: int, view: HostView) -> str | None:
        return None


class ConnectedDouble:
    connected = True


@pytest.fixture
def served():
    dataplane = CountingDataplaneDouble()
    reconciler = Reconciler(dataplane, OneInterfaceDiscoveryDouble())
    registry = CollectorRegistry()
    register_agent_metrics(registry, dataplane, reconciler, ConnectedDouble())
    server, port = start_metrics_server("127.0.0.1:0", registry, ready=reconciler.ready)
    try:
        yield dataplane, reconciler, f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def _scrape(base: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


def test_documented_names_served_and_read_live(served):
    dataplane, reconciler, base = served
    families = _scrape(base)
    assert set(families) >= DOCUMENTED
    assert families["podfence_applied_version"][("podfence_applied_version", ())] == -1
    assert families["podfence_sync_connected"][("podfence_sync_connected", ())] == 1

    reconciler.apply(
        NodeState(version=7, endpoints={"ns/a": Endpoint("ns/a", (ipaddress.ip_address("10.0.0.1"),))})
    )
    dataplane.denied_packets = 4
    families = _scrape(base)
    denied = (
        "podfence_endpoint_packets_total",
        (("direction", "ingress"), ("namespace", "ns"), ("pod", "a"), ("verdict", "denied")),
    )
    assert families["podfence_endpoint_packets"][denied] == 4
    assert families["podfence_drops"][("podfence_drops_total", (("reason", "policy_denied"),))] == 4
    assert families["podfence_applied_version"][("podfence_applied_version", ())] == 7
    assert families["podfence_managed_endpoints"][("podfence_managed_endpoints", ())] == 1
    assert families["podfence_map_capacity"][("podfence_map_capacity", (("map", "policy"),))] == 1024
    assert families["podfence_events_lost"][("podfence_events_lost_total", ())] == 2
    programming = families["podfence_policy_programming_seconds"]
    assert programming[("podfence_policy_programming_seconds_count", ())] == 1


def test_readiness_follows_the_first_applied_version(served):
    _, reconciler, base = served
    assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"{base}/readyz", timeout=5)
    assert not_ready.value.code == 503
    reconciler.apply(NodeState(version=1))
    assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200


def _families(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client import generate_latest

    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(generate_latest(registry).decode())
    }


@pytest.mark.parametrize("per_pod", [True, False])
def test_per_pod_series_switch_off_and_the_node_totals_stay(per_pod: bool) -> None:
    dataplane = CountingDataplaneDouble()
    dataplane.denied_packets = 4
    registry = CollectorRegistry()
    register_agent_metrics(registry, dataplane, Reconciler(dataplane, OneInterfaceDiscoveryDouble()),
                           ConnectedDouble(), per_pod=per_pod)
    families = _families(registry)
    totals = families["podfence_packets"]
    assert totals[(("direction", "ingress"), ("verdict", "denied"))] == 4
    assert totals[(("direction", "ingress"), ("verdict", "allowed"))] == 10
    assert totals[(("direction", "egress"), ("verdict", "denied"))] == 0, "every series from the start"
    assert ("podfence_endpoint_packets" in families) is per_pod
    assert ("podfence_endpoint_bytes" in families) is per_pod
    (build,) = families["podfence_build_info"].items()
    assert build[1] == 1 and dict(build[0])["version"]
    assert families["process_resident_memory_bytes"][()] > 0
