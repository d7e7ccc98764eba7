"""RouteTable: the longest-prefix match discovery uses instead of one RTM_GETROUTE per pod IP."""

from __future__ import annotations

import ipaddress

from agent.node.interfaces import RouteTable


def _add(table: RouteTable, cidr: str, oif: int | None, priority: int = 0) -> None:
    network = ipaddress.ip_network(cidr)
    table.add(network.version, int(network.network_address), network.prefixlen, priority, oif)


def test_longest_prefix_wins_and_lower_priority_breaks_ties():
    table = RouteTable()
    _add(table, "0.0.0.0/0", 1)
    _add(table, "10.244.0.0/16", None)  # blackhole: no interface
    _add(table, "10.244.1.0/24", 3, priority=100)
    _add(table, "10.244.1.0/24", 4, priority=10)
    _add(table, "10.244.1.5/32", 7)
    _add(table, "fd00::/64", 9)
    _add(table, "fd00::5/128", 8)

    def lookup(text: str) -> int | None:
        return table.lookup(ipaddress.ip_address(text))

    assert lookup("10.244.1.5") == 7
    assert lookup("10.244.1.6") == 4
    assert lookup("10.244.2.1") is None
    assert lookup("192.0.2.1") == 1
    assert lookup("fd00::5") == 8
    assert lookup("fd00::6") == 9
    assert lookup("fd01::1") is None  # no IPv6 default route
