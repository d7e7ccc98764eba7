"""The benchmarks' own topology (bench/_netlab.py): pods reach each other on one node and across
the node link, the datapath benchmark's filter check tells an enforcing node from an open one,
and teardown leaves no namespace behind. Needs root and network namespaces."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from agent.dataplane.netns import inside
from bench import datapath
from bench._netlab import Topology

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_ADMIN) to create netns")


@pytest.fixture
def topology() -> Iterator[Topology]:
    built = Topology(tag=f"t{os.getpid()}")
    built.build(2, [("client", 1), ("local", 1), ("remote", 2)])
    try:
        yield built
    finally:
        built.teardown()
    assert not [n for n in netns.listnetns() if n.startswith(built.prefix)]


def _refused_or_connected(client_netns: str, address: str, port: int) -> str:
    """'refused' proves the SYN reached the destination pod's kernel and its RST came back."""
    with inside(client_netns), socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((address, port))
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
    return "connected"


def test_pods_reach_each_other_on_one_node_and_across_nodes(topology: Topology) -> None:
    client = topology.pods["client"]
    for target in ("local", "remote"):
        assert _refused_or_connected(client.netns, topology.pods[target].ip, 9) == "refused"


def test_unfiltered_variant_is_not_reported_as_enforcing(topology: Topology) -> None:
    variant = datapath.Variant("none", None, 0, topology)
    assert datapath.drops_unallowed_port(variant) is False


def test_iptables_node_with_the_benchmark_state_drops_an_unallowed_port(topology: Topology) -> None:
    from agent.dataplane.iptables import IptablesDataplane

    node = topology.nodes["n1"]
    with inside(node.netns):
        plane = IptablesDataplane()
        plane.start()
        plane.apply(datapath.node_state(topology, "n1", rules=10))
    variant = datapath.Variant("iptables_10", "iptables", 10, topology)
    assert datapath.drops_unallowed_port(variant) is True
