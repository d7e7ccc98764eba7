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


def test_time_sliced_runs_measure_every_variant_through_its_own_namespace() -> None:
    """Two unfiltered variants and one whose server pod refuses every connection: the time-sliced
    runner must switch namespaces (a variant it never entered would read 0) and attribute each
    slot to the right variant (the refusing one reads 0)."""
    variants = []
    try:
        for index, tag in enumerate(("a", "b", "c")):
            topology = Topology(tag=f"s{os.getpid()}{tag}")
            topology.build(2, [("client", 1), ("local", 1), ("remote", 2)])
            variant = datapath.Variant(f"v{index}", None, 0, topology)
            variants.append(variant)
            datapath.start_servers(variant)
        refusing = variants[2].topology.pods["local"].netns
        datapath._netlab.run_in(
            refusing, ["iptables", "-A", "INPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]
        )
        connections = datapath.measure_sliced(variants, "same_node", "conn_per_s_sliced", seconds=0.3)
        assert connections["v0"] > 100 and connections["v1"] > 100
        assert connections["v2"] == 0
        stream = datapath.measure_sliced(variants[:2], "same_node", "tcp_gbps_sliced", seconds=0.6)
        assert stream["v0"] > 0.1 and stream["v1"] > 0.1  # Gbit/s
    finally:
        for variant in variants:
            datapath.destroy_variant(variant)
