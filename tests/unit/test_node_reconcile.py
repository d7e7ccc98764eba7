"""The reconcile loop with test doubles for the kernel: a recording dataplane and a scripted
discovery (both named as doubles; the real ones are exercised in tests/privileged)."""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from agent.dataplane.base import CapacityError, EndpointCounters, TemporaryDataplaneError
from agent.dataplane.types import Endpoint, IPAddress, NodeState
from agent.node.histogram import LatencyHistogram
from agent.node.interfaces import DiscoveryError, HostView, Link
from agent.node.reconcile import Reconciler, RetryPolicy

POD_A = ipaddress.ip_address("10.0.0.5")
POD_B = ipaddress.ip_address("10.0.0.6")
NODE_IP = ipaddress.ip_address("192.168.1.10")


class RecordingDataplaneDouble:
    """Records every applied NodeState; raises the queued errors first, one per call."""

    name = "recording-double"

    def __init__(self) -> None:
        self.applied: list[NodeState] = []
        self.errors: list[Exception] = []

    def start(self) -> None:
        pass

    def apply(self, state: NodeState) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.applied.append(state)

    def counters(self) -> list[EndpointCounters]:
        return []

    def close(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class ScriptedDiscoveryDouble:
    """Pretends to be the netns: a settable set of pod interfaces and an IP -> ifindex table."""

    def __init__(self) -> None:
        self.pod_interfaces: frozenset[int] = frozenset()
        self.routes: dict[IPAddress, int] = {}
        self.links: dict[int, Link] = {}
        self.macs: dict[int, str] = {}  # what the pod's end of each veth holds now
        self.fdb: dict[tuple[int, str], int] = {}
        self.scans = 0

    def scan_links(self) -> dict[int, Link]:
        # Pod interfaces without an explicit Link are plain veths whose peer is in netns 0.
        return {
            index: Link(index, f"veth{index}", "veth", peer_netnsid=0, master=None)
            for index in self.pod_interfaces
        } | self.links

    def scan(self) -> HostView:
        self.scans += 1
        return HostView(
            links=self.scan_links(),
            node_ips=(NODE_IP,),
            uplinks=frozenset({1}),
            pod_interfaces=self.pod_interfaces,
            fdb=dict(self.fdb),
        )

    def resolve(self, ip: IPAddress, view: HostView) -> int | None:
        ifindex = self.routes.get(ip)
        return ifindex if ifindex in view.pod_interfaces else None

    def mac_of(self, ifindex: int, view: HostView) -> str | None:
        return self.macs.get(ifindex)


def _desired(version: int, *pods: tuple[str, IPAddress]) -> NodeState:
    return NodeState(version=version, endpoints={key: Endpoint(key=key, ips=(ip,)) for key, ip in pods})


@pytest.fixture
def doubles() -> tuple[RecordingDataplaneDouble, ScriptedDiscoveryDouble]:
    return RecordingDataplaneDouble(), ScriptedDiscoveryDouble()


def _no_sleep(_: float) -> None:
    pass


def test_fills_ifindex_pod_interfaces_and_node_ips(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7, 8, 9})
    discovery.routes = {POD_A: 7, POD_B: 8}
    reconciler = Reconciler(dataplane, discovery)

    reconciler.apply(
        _desired(3, ("ns/a", POD_A), ("ns/b", POD_B), ("ns/c", ipaddress.ip_address("10.0.0.7")))
    )

    (state,) = dataplane.applied
    assert state.version == 3
    assert {k: e.ifindex for k, e in state.endpoints.items()} == {"ns/a": 7, "ns/b": 8, "ns/c": None}
    assert state.pod_interfaces == frozenset({7, 8, 9})
    assert state.node_ips == (NODE_IP,)
    status = reconciler.status()
    assert (status.applied_version, status.managed_endpoints, status.resolved_endpoints) == (3, 3, 2)
    assert reconciler.ready()
    assert reconciler.endpoint_for_ifindex(8) == "ns/b"


def test_two_endpoints_claiming_one_interface_leave_it_unknown(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7})
    discovery.routes = {POD_A: 7, POD_B: 7}
    Reconciler(dataplane, discovery).apply(_desired(1, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {e.ifindex for e in dataplane.applied[0].endpoints.values()} == {None}


def _bridge_ports(discovery: ScriptedDiscoveryDouble, *ports: int, bridge: int = 3) -> None:
    discovery.pod_interfaces = frozenset(ports)
    discovery.links = {p: Link(p, f"veth{p}", "veth", peer_netnsid=0, master=bridge) for p in ports}


def test_each_endpoint_is_bound_to_the_mac_its_pod_held_when_first_located(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7, 8})
    discovery.routes = {POD_A: 7, POD_B: 8}
    discovery.macs = {7: "02:00:00:00:00:07", 8: "02:00:00:00:00:08"}
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(_desired(1, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {k: e.mac for k, e in dataplane.applied[-1].endpoints.items()} == {
        "ns/a": "02:00:00:00:00:07",
        "ns/b": "02:00:00:00:00:08",
    }
    # the pod changes its MAC: the binding does not follow (the pod only cuts itself off)
    discovery.macs[7] = "02:00:00:00:00:99"
    reconciler.apply(_desired(2, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert dataplane.applied[-1].endpoints["ns/a"].mac == "02:00:00:00:00:07"


def test_a_pod_taking_the_mac_of_another_on_its_bridge_is_left_unknown(doubles):
    dataplane, discovery = doubles
    _bridge_ports(discovery, 7, 8)
    discovery.routes = {POD_A: 7}
    discovery.macs = {7: "02:00:00:00:00:07", 8: "02:00:00:00:00:07"}  # the pod behind 8 copied it
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    discovery.routes = {POD_A: 7, POD_B: 8}
    reconciler.apply(_desired(2, ("ns/a", POD_A), ("ns/b", POD_B)))
    endpoints = dataplane.applied[-1].endpoints
    assert (endpoints["ns/a"].ifindex, endpoints["ns/a"].mac) == (7, "02:00:00:00:00:07")
    assert (endpoints["ns/b"].ifindex, endpoints["ns/b"].mac) == (None, None)


def test_after_a_restart_the_forwarding_database_names_the_rightful_holder_of_a_mac(doubles):
    dataplane, discovery = doubles
    _bridge_ports(discovery, 7, 8)
    discovery.routes = {POD_A: 7, POD_B: 8}
    discovery.macs = {7: "02:00:00:00:00:07", 8: "02:00:00:00:00:07"}
    discovery.fdb = {(3, "02:00:00:00:00:07"): 7}
    Reconciler(dataplane, discovery).apply(_desired(1, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {k: e.ifindex for k, e in dataplane.applied[-1].endpoints.items()} == {"ns/a": 7, "ns/b": None}
    discovery.fdb = {}  # nothing tells them apart: both stay unknown (fail closed)
    Reconciler(dataplane, discovery).apply(_desired(1, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {e.ifindex for e in dataplane.applied[-1].endpoints.values()} == {None}


def test_routed_pods_may_share_a_mac(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7, 8})
    discovery.routes = {POD_A: 7, POD_B: 8}
    discovery.macs = {7: "02:00:00:00:00:07", 8: "02:00:00:00:00:07"}  # two links: nothing to steal
    Reconciler(dataplane, discovery).apply(_desired(1, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {k: e.ifindex for k, e in dataplane.applied[-1].endpoints.items()} == {"ns/a": 7, "ns/b": 8}


def test_retries_temporary_errors_then_acks(doubles):
    dataplane, discovery = doubles
    dataplane.errors = [TemporaryDataplaneError("xtables lock busy"), TemporaryDataplaneError("again")]
    sleeps: list[float] = []
    reconciler = Reconciler(
        dataplane, discovery, retry=RetryPolicy(initial_s=0.01, budget_s=5), sleep=sleeps.append
    )

    reconciler.apply(_desired(4, ("ns/a", POD_A)))

    assert [s.version for s in dataplane.applied] == [4]
    assert sleeps == [0.01, 0.02]  # exponential backoff
    status = reconciler.status()
    assert status.apply_errors_total == 2 and status.last_error is None


def test_temporary_errors_beyond_the_budget_nack(doubles):
    dataplane, discovery = doubles
    dataplane.errors = [TemporaryDataplaneError("busy")] * 100
    now = [0.0]

    def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    reconciler = Reconciler(
        dataplane,
        discovery,
        retry=RetryPolicy(initial_s=0.5, max_s=1, budget_s=3),
        clock=lambda: now[0],
        sleep=fake_sleep,
    )
    with pytest.raises(TemporaryDataplaneError):
        reconciler.apply(_desired(5, ("ns/a", POD_A)))
    assert dataplane.applied == []
    assert now[0] <= 3
    assert reconciler.status().applied_version is None
    assert "busy" in (reconciler.status().last_error or "")


def test_permanent_error_nacks_at_once(doubles):
    dataplane, discovery = doubles
    dataplane.errors = [CapacityError("policy map full (1024 entries)")]
    sleeps: list[float] = []
    reconciler = Reconciler(dataplane, discovery, sleep=sleeps.append)
    with pytest.raises(CapacityError, match="map full"):
        reconciler.apply(_desired(6, ("ns/a", POD_A)))
    assert sleeps == []
    assert reconciler.status().apply_errors_total == 1
    assert not reconciler.ready()


def test_reapplies_on_interface_change_without_a_new_version(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery, sleep=_no_sleep)
    reconciler.apply(_desired(2, ("ns/a", POD_A)))
    assert dataplane.applied[-1].endpoints["ns/a"].ifindex is None

    stop = threading.Event()
    loop = threading.Thread(target=reconciler.run, args=(stop,), kwargs={"debounce_s": 0}, daemon=True)
    loop.start()
    try:
        # The pod's veth appears: first as a bare interface, then its route.
        discovery.pod_interfaces = frozenset({11})
        reconciler.interfaces_changed()
        _wait_for(lambda: len(dataplane.applied) == 2)
        assert dataplane.applied[1].pod_interfaces == frozenset({11})
        assert dataplane.applied[1].endpoints["ns/a"].ifindex is None

        discovery.routes = {POD_A: 11}
        reconciler.interfaces_changed()
        _wait_for(lambda: len(dataplane.applied) == 3)
        assert dataplane.applied[2].version == 2
        assert dataplane.applied[2].endpoints["ns/a"].ifindex == 11

        # A notification that changes nothing the dataplane sees is not re-applied.
        scans = discovery.scans
        reconciler.interfaces_changed()
        _wait_for(lambda: discovery.scans > scans)
        time.sleep(0.05)
        assert len(dataplane.applied) == 3
        _, _, count = reconciler.interface_seconds.snapshot()
        assert count == 2
    finally:
        stop.set()
        reconciler.interfaces_changed()
        loop.join(timeout=5)
    assert not loop.is_alive()


def test_veth_joining_a_bridge_is_programmed_again(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({11})
    discovery.links = {11: Link(11, "veth1", "veth", peer_netnsid=0, master=None)}
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(_desired(1))
    assert reconciler.reconcile_once() is False  # nothing changed

    discovery.links = {11: Link(11, "veth1", "veth", peer_netnsid=0, master=3)}
    assert reconciler.reconcile_once() is True
    assert len(dataplane.applied) == 2


def test_location_sticks_while_the_interface_exists(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7, 8})
    discovery.routes = {POD_A: 7}
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    assert dataplane.applied[-1].endpoints["ns/a"].ifindex == 7

    discovery.routes = {}  # the FDB entry aged out: the lookup finds nothing now
    reconciler.reconcile_once()
    assert dataplane.applied[-1].endpoints["ns/a"].ifindex == 7

    discovery.routes = {POD_B: 7}  # a fresh lookup claims the interface for another pod
    reconciler.apply(_desired(2, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert {k: e.ifindex for k, e in dataplane.applied[-1].endpoints.items()} == {"ns/a": None, "ns/b": 7}

    discovery.pod_interfaces = frozenset({8})  # the veth is gone
    reconciler.reconcile_once()
    assert {e.ifindex for e in dataplane.applied[-1].endpoints.values()} == {None}


def test_interface_change_before_any_version_programs_nothing(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery)
    discovery.pod_interfaces = frozenset({3})
    assert reconciler.reconcile_once() is False
    assert dataplane.applied == []


def test_background_loop_retries_temporary_failures(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery, retry=RetryPolicy(initial_s=0.01))
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    dataplane.errors = [TemporaryDataplaneError("interface vanished")]
    discovery.pod_interfaces = frozenset({4})
    stop = threading.Event()
    loop = threading.Thread(target=reconciler.run, args=(stop,), kwargs={"debounce_s": 0}, daemon=True)
    loop.start()
    try:
        reconciler.interfaces_changed()
        _wait_for(lambda: len(dataplane.applied) == 2)
        assert dataplane.applied[1].pod_interfaces == frozenset({4})
        assert reconciler.status().apply_errors_total == 1
    finally:
        stop.set()
        reconciler.interfaces_changed()
        loop.join(timeout=5)


def test_latency_histogram_is_cumulative():
    histogram = LatencyHistogram(buckets=(0.01, 0.1))
    for seconds in (0.005, 0.05, 0.05, 3.0):
        histogram.observe(seconds)
    buckets, total, count = histogram.snapshot()
    assert buckets == [(0.01, 1), (0.1, 3), (float("inf"), 4)]
    assert count == 4 and total == pytest.approx(3.105)


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_neighbour_churn_is_ignored_once_every_endpoint_is_located(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7})
    discovery.routes = {POD_A: 7}
    reconciler = Reconciler(dataplane, discovery)
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    stop = threading.Event()
    loop = threading.Thread(target=reconciler.run, args=(stop,), kwargs={"debounce_s": 0}, daemon=True)
    loop.start()
    try:
        scans = discovery.scans
        reconciler.interfaces_changed({"neighbour"})
        time.sleep(0.1)
        assert discovery.scans == scans  # nothing to locate: no scan at all

        reconciler.apply(_desired(2, ("ns/a", POD_A), ("ns/b", POD_B)))  # ns/b not found yet
        scans = discovery.scans
        discovery.routes = {POD_A: 7, POD_B: 8}
        discovery.pod_interfaces = frozenset({7, 8})
        reconciler.interfaces_changed({"neighbour"})
        _wait_for(lambda: dataplane.applied[-1].endpoints["ns/b"].ifindex == 8)
        assert discovery.scans > scans
    finally:
        stop.set()
        reconciler.interfaces_changed()
        loop.join(timeout=5)


def test_a_refused_version_is_retried_on_interface_changes_not_on_neighbour_churn(doubles):
    dataplane, discovery = doubles
    dataplane.errors = [CapacityError("endpoints map full")]
    reconciler = Reconciler(dataplane, discovery)
    with pytest.raises(CapacityError):
        reconciler.apply(_desired(3, ("ns/a", POD_A)))
    stop = threading.Event()
    loop = threading.Thread(target=reconciler.run, args=(stop,), kwargs={"debounce_s": 0}, daemon=True)
    loop.start()
    try:
        scans = discovery.scans
        reconciler.interfaces_changed({"neighbour"})
        time.sleep(0.1)
        assert discovery.scans == scans

        reconciler.interfaces_changed({"link"})  # e.g. a pod went away: the state may fit now
        _wait_for(lambda: len(dataplane.applied) == 1)
        assert dataplane.applied[0].version == 3
        assert reconciler.status().applied_version == 3
    finally:
        stop.set()
        reconciler.interfaces_changed()
        loop.join(timeout=5)


def test_a_policy_version_reuses_the_scan_until_a_notification_says_it_changed(doubles):
    dataplane, discovery = doubles
    discovery.pod_interfaces = frozenset({7, 8})
    discovery.routes = {POD_A: 7, POD_B: 8}
    reconciler = Reconciler(dataplane, discovery, reuse_views=True)
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    reconciler.apply(_desired(2, ("ns/a", POD_A)))
    assert discovery.scans == 2  # no notification yet: nothing vouches for the first scan

    reconciler.interfaces_changed()  # what the monitor says once it has subscribed
    reconciler.apply(_desired(3, ("ns/a", POD_A)))
    scans = discovery.scans
    reconciler.apply(_desired(4, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert discovery.scans == scans
    assert {k: e.ifindex for k, e in dataplane.applied[-1].endpoints.items()} == {"ns/a": 7, "ns/b": 8}

    # A routed node's view holds no neighbours: their churn does not make it stale.
    reconciler.interfaces_changed({"neighbour"})
    reconciler.apply(_desired(5, ("ns/a", POD_A)))
    assert discovery.scans == scans

    discovery.pod_interfaces = frozenset({7})  # ns/b's veth is gone
    reconciler.interfaces_changed({"link"})
    reconciler.apply(_desired(6, ("ns/a", POD_A), ("ns/b", POD_B)))
    assert discovery.scans == scans + 1
    assert dataplane.applied[-1].pod_interfaces == frozenset({7})
    assert dataplane.applied[-1].endpoints["ns/b"].ifindex is None


def test_neighbour_churn_makes_a_bridged_view_stale(doubles):
    dataplane, discovery = doubles
    discovery.links = {3: Link(3, "br0", "bridge", peer_netnsid=None, master=None)}
    reconciler = Reconciler(dataplane, discovery, reuse_views=True)
    reconciler.interfaces_changed()
    reconciler.apply(_desired(1))
    scans = discovery.scans
    reconciler.interfaces_changed({"neighbour"})
    reconciler.apply(_desired(2))
    assert discovery.scans == scans + 1


def test_without_reuse_every_version_scans(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery)
    reconciler.interfaces_changed()
    for version in (1, 2, 3):
        reconciler.apply(_desired(version))
    assert discovery.scans == 3


def test_a_retry_and_the_background_loop_scan_afresh(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery, sleep=_no_sleep, reuse_views=True)
    reconciler.interfaces_changed()
    reconciler.apply(_desired(1, ("ns/a", POD_A)))
    scans = discovery.scans
    dataplane.errors = [TemporaryDataplaneError("interface vanished")]
    reconciler.apply(_desired(2, ("ns/a", POD_A)))
    assert discovery.scans == scans + 1  # the first try reused the view, the retry did not

    reconciler.reconcile_once()  # what the periodic resync runs: it covers dropped notifications
    assert discovery.scans == scans + 2


def test_a_failed_scan_leaves_no_view_to_reuse(doubles):
    dataplane, discovery = doubles
    reconciler = Reconciler(dataplane, discovery, sleep=_no_sleep, reuse_views=True)
    reconciler.interfaces_changed()
    reconciler.apply(_desired(1))
    real_scan = discovery.scan
    failures = [DiscoveryError("netlink dump failed")]

    def flaky_scan() -> HostView:
        if failures:
            raise failures.pop()
        return real_scan()

    discovery.scan = flaky_scan  # type: ignore[method-assign]
    reconciler.interfaces_changed({"route"})
    discovery.pod_interfaces = frozenset({7})
    discovery.routes = {POD_A: 7}
    reconciler.apply(_desired(2, ("ns/a", POD_A)))  # the scan fails once, the retry scans again
    assert dataplane.applied[-1].endpoints["ns/a"].ifindex == 7
    scans = discovery.scans
    reconciler.apply(_desired(3, ("ns/a", POD_A)))
    assert discovery.scans == scans
