"""A version that failed and was programmed later is acked then; readiness waits for the kernel.

The reconciler runs with a recording dataplane double; the late-ack test goes through a real
control service and SyncClient over loopback gRPC, so what is checked is what `podfence status`
would show.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import threading
from contextlib import redirect_stdout

import pytest

from agent.control import status as status_cmd
from agent.dataplane.base import Adopting, CapacityError, EndpointCounters
from agent.dataplane.types import Endpoint, IPAddress, NodeState
from agent.node.interfaces import DiscoveryError, HostView, Link
from agent.node.reconcile import Reconciler, RetryPolicy
from agent.node.sync import SyncClient
from tests.unit.control_helpers import allow_from, small_cluster, start_control, wait_until


class RefusingDataplaneDouble:
    """Records what it is given; raises `refuse` (a full map, a busy lock) while it is set."""

    name = "refusing-double"

    def __init__(self, adopted: bool = False) -> None:
        self.refuse: Exception | None = None
        self.applied: list[NodeState] = []
        self.adopted = adopted

    def start(self) -> None: ...

    def apply(self, state: NodeState) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.applied.append(state)

    def counters(self) -> list[EndpointCounters]:
        return []

    def close(self) -> None: ...

    def teardown(self) -> None: ...


class OneInterfaceDiscoveryDouble:
    fail = False

    def scan(self) -> HostView:
        if self.fail:
            raise DiscoveryError("netlink dump interrupted")
        return HostView(links={}, node_ips=(), uplinks=frozenset(), pod_interfaces=frozenset({5}))

    def scan_links(self) -> dict[int, Link]:
        return {}

    def resolve(self, ip: IPAddress, view: HostView) -> int | None:
        return 5

    def mac_of(self, ifindex: int, view: HostView) -> str | None:
        return None


def desired(version: int, ip: str = "10.0.0.1") -> NodeState:
    endpoint = Endpoint("ns/a", (ipaddress.ip_address(ip),))
    return NodeState(version=version, endpoints={endpoint.key: endpoint})


def reconciler_with(dataplane: RefusingDataplaneDouble) -> Reconciler:
    return Reconciler(
        dataplane, OneInterfaceDiscoveryDouble(), retry=RetryPolicy(budget_s=0.0), sleep=lambda _: None
    )


def test_a_refused_version_programmed_later_is_reported_once_and_clears_the_error() -> None:
    dataplane = RefusingDataplaneDouble()
    reconciler = reconciler_with(dataplane)
    recovered: list[int] = []
    reconciler.on_recovered(recovered.append)
    dataplane.refuse = CapacityError("BPF map pf_policy would need 9 entries but holds 8")
    with pytest.raises(CapacityError):
        reconciler.apply(desired(4))
    assert "pf_policy" in (reconciler.status().last_error or "")
    with pytest.raises(CapacityError):
        reconciler.reconcile_once()  # still full: nothing to report
    assert recovered == []

    dataplane.refuse = None  # room was made; the next resync or interface change retries
    assert reconciler.reconcile_once()
    assert recovered == [4]
    status = reconciler.status()
    assert status.applied_version == 4 and status.last_error is None
    reconciler.reconcile_once()  # nothing failed since: no second report
    assert recovered == [4]


def test_a_success_without_kernel_changes_clears_a_stale_error() -> None:
    dataplane = RefusingDataplaneDouble()
    discovery = OneInterfaceDiscoveryDouble()
    reconciler = Reconciler(dataplane, discovery, retry=RetryPolicy(budget_s=0.0), sleep=lambda _: None)
    reconciler.apply(desired(1))
    discovery.fail = True
    with pytest.raises(DiscoveryError):
        reconciler.reconcile_once()
    assert reconciler.status().last_error is not None
    discovery.fail = False
    assert not reconciler.reconcile_once()  # the kernel holds exactly this already: nothing written
    assert len(dataplane.applied) == 1
    status = reconciler.status()
    assert status.applied_version == 1 and status.last_error is None


def _node_status(target: str, node: str) -> dict:
    out = io.StringIO()
    args = argparse.Namespace(
        control=target, json=True, insecure=False, tls_cert=None, tls_key=None, tls_ca=None, timeout=5.0
    )
    with redirect_stdout(out):
        assert status_cmd.run(args) == 0
    return dict(json.loads(out.getvalue())["nodes"].get(node, {}))


def test_the_control_service_sees_the_late_ack_and_no_stale_error() -> None:
    control = start_control(small_cluster())
    dataplane = RefusingDataplaneDouble()
    reconciler = Reconciler(dataplane, OneInterfaceDiscoveryDouble(), retry=RetryPolicy(budget_s=0.0))
    client = SyncClient("n2", control.target, reconciler.apply, backoff_initial=0.05, backoff_max=0.3)
    reconciler.on_recovered(client.applied_late)
    stop = threading.Event()
    thread = threading.Thread(target=client.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: _node_status(control.target, "n2").get("applied_version") == control.hub.version)
        dataplane.refuse = CapacityError("ipset pf-i4-7 needs 3 entries, maxelem is 2")
        with control.hub.change() as resolver:
            resolver.upsert(allow_from("web-from-client", "web", "client", 7070))
        refused = control.hub.version
        wait_until(lambda: "maxelem" in (_node_status(control.target, "n2")["last_error"] or ""), what="nack")
        assert _node_status(control.target, "n2")["applied_version"] < refused

        dataplane.refuse = None
        reconciler.reconcile_once()  # what the background loop does on the next change or resync
        wait_until(
            lambda: _node_status(control.target, "n2")["applied_version"] == refused, what="the late ack"
        )
        assert _node_status(control.target, "n2")["last_error"] is None
        assert client.last_applied_version == refused
    finally:
        stop.set()
        thread.join(5)
        control.stop()


def test_unready_until_the_first_version_is_programmed() -> None:
    dataplane = RefusingDataplaneDouble()
    assert isinstance(dataplane, Adopting) and not dataplane.adopted
    reconciler = reconciler_with(dataplane)
    assert not reconciler.ready()
    dataplane.refuse = CapacityError("full")
    with pytest.raises(CapacityError):
        reconciler.apply(desired(1))
    assert not reconciler.ready(), "a snapshot the kernel refused enforces nothing"
    dataplane.refuse = None
    reconciler.reconcile_once()
    assert reconciler.ready()


def test_ready_before_any_snapshot_when_state_of_a_previous_run_was_adopted() -> None:
    dataplane = RefusingDataplaneDouble(adopted=True)
    reconciler = reconciler_with(dataplane)
    assert not reconciler.ready()
    reconciler.mark_adopted()  # what the agent does when dataplane.adopted after start()
    assert reconciler.ready() and reconciler.status().adopted
