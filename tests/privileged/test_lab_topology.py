"""The node lab itself, without podfence: addressing, Services, servers, prober and cleanup.

Each module-scoped lab is built once per CNI mode and torn down at the end; the teardown test
asserts that nothing of it is left in the root netns, /run/netns or bpffs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from agent.lab import wiring
from agent.lab.machine import RUN_DIR, LabError, leftovers, teardown
from agent.lab.prober import Endpoint, Probe, TruthTable, probe_table, run_probes, server_reply
from agent.lab.scenarios import upstream_pods
from agent.lab.topology import (
    BLACKHOLED6_IN_NODES,
    BLACKHOLED6_IN_ROOT,
    BLACKHOLED_IN_NODES,
    BLACKHOLED_IN_ROOT,
    CniMode,
    Lab,
    run_in_netns,
)

RTN_BLACKHOLE = 6

# Another test session may be using the lab; wait for it (within pytest's 300 s per test).
LAB_LOCK_WAIT_S = 240.0


@pytest.fixture(
    scope="module",
    params=[(mode, ipv6) for ipv6 in (False, True) for mode in CniMode],
    ids=lambda p: p[0].value + ("-dualstack" if p[1] else ""),
)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    teardown(LAB_LOCK_WAIT_S)  # a crashed earlier run must not make this one fail
    mode, ipv6 = request.param
    built = Lab(node_count=2, mode=mode, ipv6=ipv6)
    built.build(upstream_pods(2), lock_wait_seconds=LAB_LOCK_WAIT_S)
    try:
        yield built
    finally:
        teardown(LAB_LOCK_WAIT_S)


def _endpoints(lab: Lab, to: str = "service", family: int = 4) -> list[Endpoint]:
    endpoints = []
    for p in lab.pods.values():
        address = (
            (p.service_ip if to == "service" else p.ip)
            if family == 4
            else (p.service_ip6 if to == "service" else p.ip6)
        )
        assert address is not None
        endpoints.append(Endpoint(p.key, p.netns, address))
    return endpoints


def _ipv4_only(lab: Lab) -> bool:
    """On an IPv4-only lab the IPv6 checks reduce to: no pod got an IPv6 address or Service."""
    if lab.ipv6:
        return False
    assert all(p.ip6 is None and p.service_ip6 is None for p in lab.pods.values())
    return True


@pytest.mark.parametrize("protocol", ["TCP", "UDP", "SCTP"])
def test_dual_stack_pods_reach_every_ipv6_service(lab: Lab, protocol: str) -> None:
    if _ipv4_only(lab):
        return
    endpoints = _endpoints(lab, family=6)
    observed = probe_table(endpoints, endpoints, 80, protocol)
    assert TruthTable.filled(observed.sources, observed.targets).differences(observed) == [], (
        observed.render()
    )


def test_dual_stack_icmpv6_and_backends(lab: Lab) -> None:
    if _ipv4_only(lab):
        return
    endpoints = _endpoints(lab, to="pod", family=6)
    observed = probe_table(endpoints, endpoints, 0, "ICMP")
    assert TruthTable.filled(observed.sources, observed.targets).differences(observed) == []
    source = lab.pods["x/a"]
    for target in lab.pods.values():
        if target is not source:
            assert target.service_ip6 is not None
            probe = Probe(source.key, source.netns, target.key, target.service_ip6, 81, "TCP")
            assert server_reply(probe) == target.spec.name
    assert {str(n) for n in BLACKHOLED6_IN_ROOT} <= _blackholes(None, family=10)
    for node in lab.nodes.values():
        assert {str(n) for n in BLACKHOLED6_IN_NODES} <= _blackholes(node.netns, family=10)


def test_pod_ips_and_icmp_reachable(lab: Lab) -> None:
    endpoints = _endpoints(lab, to="pod")
    observed = probe_table(endpoints, endpoints, 0, "ICMP")
    assert TruthTable.filled(observed.sources, observed.targets).differences(observed) == []


def test_unserved_port_is_judged_blocked(lab: Lab) -> None:
    pods = list(lab.pods.values())
    probes = [
        Probe(pods[0].key, pods[0].netns, pods[1].key, pods[1].service_ip, 82, protocol)
        for protocol in ("TCP", "UDP", "SCTP")
    ]
    assert run_probes(probes, timeout=0.5) == {probe: False for probe in probes}


def test_service_dnats_to_its_own_backend(lab: Lab) -> None:
    source = lab.pods["x/a"]
    for target in lab.pods.values():
        if target is source:
            continue  # hairpin to oneself is not modelled (upstream ignores loopback cells too)
        for protocol in ("TCP", "UDP"):
            probe = Probe(source.key, source.netns, target.key, target.service_ip, 80, protocol)
            assert server_reply(probe) == target.spec.name, f"{target.service_ip} -> wrong backend"
    for node in lab.nodes.values():
        rules = run_in_netns(node.netns, ["iptables-save", "-t", "nat"]).stdout
        for pod in lab.pods.values():
            assert f"-d {pod.service_ip}/32" in rules and f"--to-destination {pod.ip}" in rules


def _blackholes(netns_name: str | None, family: int = 2) -> set[str]:
    with IPRoute(netns=netns_name) if netns_name else IPRoute() as ipr:
        return {
            f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            for r in ipr.get_routes(family=family, table=254)
            if r["type"] == RTN_BLACKHOLE
        }


def test_lab_ranges_are_blackholed_in_root_and_every_node(lab: Lab) -> None:
    assert {str(n) for n in BLACKHOLED_IN_ROOT} <= _blackholes(None)
    for node in lab.nodes.values():
        assert {str(n) for n in BLACKHOLED_IN_NODES} <= _blackholes(node.netns)
        # An address inside the pod range with no pod behind it must hit the blackhole, not leave.
        route = run_in_netns(node.netns, ["ip", "route", "get", "10.240.99.1"], check=False)
        assert route.returncode != 0 or "blackhole" in route.stdout or "unreachable" in route.stderr


def test_agents_can_find_pod_interfaces_without_names(lab: Lab) -> None:
    """The contract the agent relies on: route lookup (routed) or bridge FDB (bridged) finds the pod."""
    for pod in lab.pods.values():
        node = lab.nodes[pod.spec.node]
        if lab.mode is CniMode.ROUTED:
            route = run_in_netns(node.netns, ["ip", "route", "get", pod.ip]).stdout
            assert f"dev {pod.host_ifname}" in route
        else:
            mac = wiring.mac(pod.netns, "eth0")
            fdb = run_in_netns(node.netns, ["bridge", "fdb", "show", "br", "cni0"]).stdout
            assert f"{mac} dev {pod.host_ifname}" in fdb


def test_building_a_second_lab_is_refused(lab: Lab) -> None:
    with pytest.raises(LabError, match="already up"):
        Lab().build(upstream_pods(2))


def test_lab_down_after_a_crash_leaves_nothing_behind(tmp_path: Path) -> None:
    teardown(LAB_LOCK_WAIT_S)
    # A lab built by a process that dies without cleaning up, like a Ctrl-C'd or killed run.
    crashed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "lab", "--lock-wait", "240", "up", "--mode", "bridged", "--ipv6"],
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == 0, crashed.stderr
    servers_pid = int((RUN_DIR / "servers.pid").read_text())
    # A process someone started inside a node by hand: no pid file names it.
    stray = subprocess.Popen(["nsenter", "--net=/run/netns/pflab-node1", "sleep", "300"])
    assert leftovers(), "the lab should exist before lab down"
    down = subprocess.run(
        [sys.executable, "-m", "agent.cli", "lab", "--lock-wait", "240", "down"],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 0, down.stderr
    assert leftovers() == []
    assert not Path(f"/proc/{servers_pid}").exists()
    assert stray.wait(timeout=5) == -15  # SIGTERM from lab down
