"""The flows a change resets, computed once for both dataplanes (agent/dataplane/flow_reset.py),
and the bpf dataplane's way back from its 16-byte prefixes to the networks they stand for."""

from __future__ import annotations

import ipaddress

import pytest

from agent.dataplane.bpf.structs import network_from_prefix, network_prefix
from agent.dataplane.flow_reset import FlowReset

A1, A2 = ipaddress.ip_address("10.1.0.7"), ipaddress.ip_address("fd00::7")


def test_changed_endpoints_bring_their_addresses_and_moved_peers_their_networks() -> None:
    reset = FlowReset.of(
        changed_endpoints={"ns/a", "ns/gone"},  # "ns/gone" has no addresses any more
        endpoint_ips={"ns/a": (A1, A2), "ns/b": (ipaddress.ip_address("10.1.0.8"),)},
        moved_peers=[ipaddress.ip_address("10.2.0.1"), ipaddress.ip_network("192.168.0.0/16")],
    )
    assert reset.texts() == ["10.1.0.7/32", "10.2.0.1/32", "192.168.0.0/16", "fd00::7/128"]


def test_nothing_changed_resets_nothing() -> None:
    assert not FlowReset.of(set(), {"ns/a": (A1,)}, [])


@pytest.mark.parametrize(
    "network", ["10.0.0.0/8", "10.1.0.7/32", "0.0.0.0/0", "fd00::/64", "::/0", "fd00::7/128", "::/80"]
)
def test_a_datapath_prefix_turns_back_into_its_network(network: str) -> None:
    parsed = ipaddress.ip_network(network)
    assert network_from_prefix(*network_prefix(parsed)) == parsed
