"""Which established flows a change must reset, for both dataplanes (established_on_change="reset").

A flow's verdict may differ after an apply if one of its ends is an endpoint whose policy
changed, or an address whose peer class changed (an identity that moved, a CIDR class that
changed). Each dataplane says which endpoints and peers its change touched (the bpf dataplane
from policy ids and peer classes, the iptables dataplane from chain names and set members);
this module turns that into the one list of addresses and networks whose flows are forgotten,
and each dataplane forgets them in its own conntrack (the bpf map, the kernel's conntrack).
An endpoint that is gone needs nothing: its flows die with its interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.dataplane.types import IPAddress, IPNetwork


@dataclass(frozen=True)
class FlowReset:
    """Forget every flow from or to an address in one of `networks` (a single address is its
    host network, /32 or /128)."""

    networks: frozenset[IPNetwork] = frozenset()

    @classmethod
    def of(
        cls,
        changed_endpoints: Iterable[str],
        endpoint_ips: Mapping[str, Iterable[IPAddress]],
        moved_peers: Iterable[IPAddress | IPNetwork],
    ) -> FlowReset:
        """`changed_endpoints`: keys of endpoints whose policy changed; `endpoint_ips`: the
        addresses of the endpoints there now; `moved_peers`: addresses and networks whose peer
        class changed."""
        networks = {ipaddress.ip_network(ip) for key in changed_endpoints for ip in endpoint_ips.get(key, ())}
        networks |= {ipaddress.ip_network(peer) for peer in moved_peers}
        return cls(frozenset(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def texts(self) -> list[str]:
        """CIDR notation, sorted: what conntrack tools and logs take."""
        return sorted(str(network) for network in self.networks)
