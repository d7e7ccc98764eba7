"""The topology builder's own promises (agent/lab/wiring.py): what it sets lands in the namespace
it names and nowhere else, and a failed step says which one."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab import wiring

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=3)
except ConnectionRefusedError:
    print("refused")
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pfw-{secrets.token_hex(3)}"
    wiring.create(name)
    try:
        yield name
    finally:
        wiring.remove(name)


def test_sysctl_lands_in_the_named_namespace_only(netns: str) -> None:
    key = "net.ipv4.conf.default.rp_filter"
    root_before = Path("/proc/sys/net/ipv4/conf/default/rp_filter").read_text().strip()
    other = "2" if root_before != "2" else "1"
    wiring.sysctl(netns, {key: other})
    assert wiring.run_in(netns, ["sysctl", "-n", key]).stdout.strip() == other
    assert Path("/proc/sys/net/ipv4/conf/default/rp_filter").read_text().strip() == root_before


def test_a_failed_step_names_itself(netns: str) -> None:
    with pytest.raises(wiring.WiringError, match=r"net\.ipv4\.no_such_knob"):
        wiring.sysctl(netns, {"net.ipv4.no_such_knob": 1})
    with pytest.raises(wiring.WiringError, match="interface nosuch0 not found"):
        wiring.mac(netns, "nosuch0")
    with pytest.raises(wiring.WiringError, match=f"false in {netns} failed"):
        wiring.run_in(netns, ["false"])


def test_routed_pod_reaches_its_gateway_and_the_node_routes_to_it(netns: str) -> None:
    pod = f"{netns}-pod"
    wiring.create(pod)
    try:
        host = wiring.wire_routed(netns, pod, "pfw0", "10.123.0.5")
        assert wiring.mac(netns, "pfw0") != wiring.mac(pod, "eth0")
        route = wiring.run_in(netns, ["ip", "route", "get", "10.123.0.5"]).stdout
        assert "dev pfw0" in route
        with wiring.ipr(netns) as ipr:
            assert wiring.index(ipr, "pfw0") == host
        # a closed port of the gateway answers with a reset: the pod's route and ARP work
        refused = wiring.run_in(pod, [sys.executable, "-c", CONNECT, wiring.GATEWAY], check=False)
        assert refused.stdout.strip() == "refused", refused.stderr
    finally:
        wiring.remove(pod)
