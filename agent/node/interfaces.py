"""Interface discovery: which host interfaces lead to pods, which pod IP sits behind which of them.

The control service names pods and their IPs; it cannot know ifindexes. This module finds them
from the kernel's own tables in the agent's network namespace, without naming conventions:

- candidate pod interfaces are links whose peer lives in another network namespace (veths report
  IFLA_LINK_NETNSID), bridge ports included, minus the uplinks: links that routes send to a
  gateway (the default route's above all), the bridge port behind such a gateway, and links
  holding a node address on a subnet (a pod's host veth holds at most a /32 gateway address, as
  the ptp plugin gives it);
- a pod IP maps to its host-side interface through a route lookup (routed CNIs: a /32 or /128 via
  the veth) and, when that route points at a bridge, through the neighbour table (IP -> MAC) and the
  bridge's forwarding database (MAC -> port); a pod that never got learned (the dataplane drops
  an unknown pod's first packets, ARP included) is found by the address its side of the veth
  holds, read through the peer's netnsid, when exactly one bridge port's peer holds it;
- the node's addresses are every non-link-local, non-loopback address here, plus IPv4 link-local
  gateway addresses on pod interfaces (169.254.1.1 style): the node's own stack picks those as the
  source of what it sends to its pods, and node traffic to local pods must always pass.

What wakes a new scan is monitor.py's: the kernel's notifications of those tables.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import NTF_USE, NUD_FAILED, NUD_INCOMPLETE, NUD_NONE, NUD_PERMANENT

from agent.dataplane.linkdump import dump_links
from agent.dataplane.types import IPAddress

log = logging.getLogger(__name__)

_RTN_UNICAST = 1
# Rule attributes that make a rule select only some packets (so the main table is not the answer).
_RULE_SELECTORS = (
    "FRA_FWMARK",
    "FRA_IIFNAME",
    "FRA_OIFNAME",
    "FRA_UID_RANGE",
    "FRA_L3MDEV",
    "FRA_IP_PROTO",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
)
_FR_ACT_TO_TBL = 1
# Neighbour states that carry no usable MAC yet.
_NEIGH_UNUSABLE = NUD_INCOMPLETE | NUD_FAILED


class DiscoveryError(Exception):
    """Netlink refused a dump; the cause is chained."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND ("veth", "bridge", ...) or "" for physical devices
    peer_netnsid: int | None  # set when the link's peer lives in another network namespace
    master: int | None  # the bridge (or other master) this link is enslaved to
    peer_index: int | None = None  # IFLA_LINK: the peer's ifindex inside that namespace


class RouteTable:
    """Longest-prefix match over the main table's routes, done here instead of one RTM_GETROUTE
    per pod IP (a full pass on a 100-pod node was dominated by those round trips). Only exact
    while routing rules are the default ones (local, main, default); scan() checks that."""

    def __init__(self) -> None:
        # family -> prefix length -> network as int -> (priority, oif or None for non-unicast)
        self._by_length: dict[int, dict[int, dict[int, tuple[int, int | None]]]] = {4: {}, 6: {}}

    def add(self, version: int, network: int, prefixlen: int, priority: int, oif: int | None) -> None:
        table = self._by_length[version].setdefault(prefixlen, {})
        current = table.get(network)
        if current is None or priority < current[0]:
            table[network] = (priority, oif)

    def lookup(self, ip: IPAddress) -> int | None:
        by_length = self._by_length[ip.version]
        width = ip.max_prefixlen
        value = int(ip)
        for prefixlen in sorted(by_length, reverse=True):
            network = value & (((1 << prefixlen) - 1) << (width - prefixlen)) if prefixlen else 0
            hit = by_length[prefixlen].get(network)
            if hit is not None:
                return hit[1]
        return None


@dataclass(frozen=True)
class HostView:
    """One consistent look at this network namespace, taken by `InterfaceDiscovery.scan`."""

    links: dict[int, Link]
    node_ips: tuple[IPAddress, ...]
    uplinks: frozenset[int]
    pod_interfaces: frozenset[int]
    # (bridge ifindex, MAC) -> port ifindex, from the bridge forwarding databases.
    fdb: dict[tuple[int, str], int] = field(default_factory=dict)
    # (ifindex, IP) -> MAC, from the neighbour tables (usable entries only).
    neighbours: dict[tuple[int, IPAddress], str] = field(default_factory=dict)
    # The main routing table, when the routing rules are the default ones (else None: ask the kernel).
    routes: RouteTable | None = field(default=None, compare=False)
    # Filled lazily by `resolve`: bridge port ifindex -> addresses its peer holds in the pod.
    peer_addresses: dict[int, frozenset[IPAddress]] = field(default_factory=dict, compare=False)

    @property
    def bridged(self) -> bool:
        """Whether neighbours and FDB entries take part in locating pods here."""
        return any(link.kind == "bridge" for link in self.links.values())


def _is_node_address(ip: IPAddress) -> bool:
    return not (ip.is_link_local or ip.is_loopback)


class InterfaceDiscovery:
    """Reads links, addresses, routes, neighbours and FDB entries of the current netns.

    Not thread-safe: the reconcile loop serialises its calls. `excluded_names` lets an operator
    mark extra uplinks explicitly (never needed when the uplink carries the default route).
    `netns` names a network namespace to look at instead of the current one (tests, the lab).
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        excluded_names: Iterable[str] = (),
        active_probe: bool = True,
        probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._netns = netns
        self._ipr = IPRoute(netns=netns) if netns else IPRoute()
        self._excluded_names = frozenset(excluded_names)
        self._active_probe = active_probe
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._last_probe: dict[IPAddress, float] = {}

    def close(self) -> None:
        self._ipr.close()

    # -- one snapshot of the namespace -------------------------------------------------------

    def scan(self) -> HostView:
        try:
            links = {link.index: link for link in self._links()}
            addresses = self._addresses()
            # Neighbours and FDB entries only matter behind a bridge; routed nodes skip both
            # dumps (the FDB alone holds a few multicast entries per veth).
            bridged = any(link.kind == "bridge" for link in links.values())
            fdb = self._fdb() if bridged else {}
            neighbours = self._neighbours() if bridged else {}
            gateway_oifs, gateways, main_table = self._main_routes()
            routes = main_table if self._default_rules_only() else None
        except (NetlinkError, OSError) as exc:
            raise DiscoveryError(f"netlink dump failed: {exc}") from exc
        uplinks = set(gateway_oifs)
        uplinks.update(
            index
            for index, ip, prefixlen in addresses
            if _is_node_address(ip) and prefixlen < ip.max_prefixlen
        )
        uplinks.update(link.index for link in links.values() if link.name in self._excluded_names)
        # When a gateway sits behind a bridge, the uplink is the bridge port behind which the
        # gateway's MAC was learned; that port may well be a veth into another netns.
        for oif, gateway in gateways:
            mac = neighbours.get((oif, gateway))
            port = fdb.get((oif, mac)) if mac else None
            if port is not None:
                uplinks.add(port)
        pod_interfaces = frozenset(
            link.index
            for link in links.values()
            if link.peer_netnsid is not None and link.index not in uplinks
        )
        node_ips = tuple(
            sorted(
                {
                    ip
                    for index, ip, _ in addresses
                    if _is_node_address(ip)
                    or (ip.version == 4 and ip.is_link_local and index in pod_interfaces)
                },
                key=_ip_sort_key,
            )
        )
        return HostView(
            links=links,
            node_ips=node_ips,
            uplinks=frozenset(uplinks),
            pod_interfaces=pod_interfaces,
            fdb=fdb,
            neighbours=neighbours,
            routes=routes,
        )

    def scan_links(self) -> dict[int, Link]:
        """Links only: the cheap first look after a notification (one dump, no per-pod lookups)."""
        try:
            return {link.index: link for link in self._links()}
        except (NetlinkError, OSError) as exc:
            raise DiscoveryError(f"netlink dump failed: {exc}") from exc

    def _links(self) -> list[Link]:
        if self._netns is None:
            # The lean dump reads the calling thread's namespace, which is ours.
            return [
                Link(raw.index, raw.name, raw.kind, raw.peer_netnsid, raw.master, raw.peer_index)
                for raw in dump_links()
            ]
        return self._links_pyroute2()

    def _links_pyroute2(self) -> list[Link]:
        result = []
        for msg in self._ipr.get_links():
            info = msg.get("IFLA_LINKINFO")
            kind = (info.get("IFLA_INFO_KIND") if info is not None else None) or ""
            result.append(
                Link(
                    index=msg["index"],
                    name=msg.get("IFLA_IFNAME") or "",
                    kind=kind,
                    peer_netnsid=msg.get("IFLA_LINK_NETNSID"),
                    master=msg.get("IFLA_MASTER"),
                    peer_index=msg.get("IFLA_LINK"),
                )
            )
        return result

    def _addresses(self) -> list[tuple[int, IPAddress, int]]:
        """(ifindex, address, prefix length) of every address here."""
        result = []
        for msg in self._ipr.get_addr():
            raw = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if raw:
                result.append((msg["index"], ipaddress.ip_address(raw), msg["prefixlen"]))
        return result

    def _fdb(self) -> dict[tuple[int, str], int]:
        entries: dict[tuple[int, str], int] = {}
        for msg in self._ipr.fdb("dump"):
            bridge = msg.get("NDA_MASTER")
            mac = msg.get("NDA_LLADDR")
            # Permanent entries are the ports' own MACs, not something learned behind them.
            if bridge is None or not mac or msg["state"] & NUD_PERMANENT:
                continue
            entries[(bridge, mac.lower())] = msg["ifindex"]
        return entries

    def _neighbours(self) -> dict[tuple[int, IPAddress], str]:
        entries: dict[tuple[int, IPAddress], str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._ipr.get_neighbours(family=family):
                dst, mac = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
                if not dst or not mac or msg["state"] & _NEIGH_UNUSABLE:
                    continue
                entries[(msg["ifindex"], ipaddress.ip_address(dst))] = mac.lower()
        return entries

    def _main_routes(self) -> tuple[set[int], list[tuple[int, IPAddress]], RouteTable]:
        """The main table, plus what leads away from this node: the default route's interface and
        every interface a route sends to a next-hop gateway (pod routes are direct)."""
        oifs: set[int] = set()
        gateways: list[tuple[int, IPAddress]] = []
        table = RouteTable()
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for msg in self._ipr.get_routes(family=family, table=254):
                hops = _route_hops(msg)
                for oif, gateway in hops:
                    if gateway is not None:
                        oifs.add(oif)
                        gateways.append((oif, gateway))
                    elif msg["dst_len"] == 0:
                        oifs.add(oif)
                destination = msg.get("RTA_DST")
                network = int(ipaddress.ip_address(destination)) if destination else 0
                unicast = msg["type"] == _RTN_UNICAST and hops
                table.add(
                    version,
                    network,
                    msg["dst_len"],
                    msg.get("RTA_PRIORITY") or 0,
                    hops[0][0] if unicast else None,
                )
        return oifs, gateways, table

    def _default_rules_only(self) -> bool:
        """True when every IPv4/IPv6 routing rule is a plain lookup of local, main or default."""
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in self._ipr.get_rules(family=family):
                table = rule.get("FRA_TABLE") or rule["table"]
                plain = (
                    rule["action"] == _FR_ACT_TO_TBL
                    and table in (253, 254, 255)
                    and not rule["src_len"]
                    and not rule["dst_len"]
                    and not rule["tos"]
                    and rule.get("FRA_SUPPRESS_PREFIXLEN") in (None, 0xFFFFFFFF)
                    and all(
                        rule.get(attr) is None
                        for attr in (
                            "FRA_FWMARK",
                            "FRA_IIFNAME",
                            "FRA_OIFNAME",
                            "FRA_UID_RANGE",
                            "FRA_L3MDEV",
                        )
                    )
                )
                if not plain:
                    return False
        return True

    # -- pod IP -> host-side interface -------------------------------------------------------

    def route_oif(self, ip: IPAddress) -> int | None:
        """The interface the kernel would send `ip`'s packets out of (RTM_GETROUTE)."""
        try:
            replies = self._ipr.route("get", dst=str(ip))
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                return None
            raise DiscoveryError(f"route lookup of {ip} failed: {exc}") from exc
        for msg in replies:
            oif = msg.get("RTA_OIF")
            if oif is not None:
                return int(oif)
        return None

    def resolve(self, ip: IPAddress, view: HostView) -> int | None:
        """The pod interface behind `ip`, or None when this node cannot tell (yet)."""
        oif = view.routes.lookup(ip) if view.routes is not None else self.route_oif(ip)
        if oif is None:
            return None
        if oif in view.pod_interfaces:
            return oif
        link = view.links.get(oif)
        if link is None or link.kind != "bridge":
            return None
        mac = view.neighbours.get((oif, ip))
        port = view.fdb.get((oif, mac)) if mac is not None else None
        if port in view.pod_interfaces:
            return port
        self._maybe_probe(ip, oif)
        return self._port_holding(ip, oif, view)

    def _port_holding(self, ip: IPAddress, bridge: int, view: HostView) -> int | None:
        """The bridge port whose peer (inside the pod) holds `ip`, when exactly one does.

        The fallback for a pod the neighbour table and FDB do not know: a new pod whose first
        packets (ARP included) the dataplane drops as an unknown endpoint never gets learned, so
        only the pod's own interface can tell. What a pod says about itself is trusted only when
        unambiguous; a pod claiming another's address makes both unknown (fail-closed).
        """
        ports = [
            link
            for link in view.links.values()
            if link.master == bridge and link.index in view.pod_interfaces and link.peer_index is not None
        ]
        holders = [link.index for link in ports if ip in self._peer_addresses_of(link, view)]
        return holders[0] if len(holders) == 1 else None

    def _peer_addresses_of(self, link: Link, view: HostView) -> frozenset[IPAddress]:
        cached = view.peer_addresses.get(link.index)
        if cached is None:
            try:
                cached = frozenset(asyncio.run(self._dump_peer_addresses(link)))
            except (NetlinkError, OSError) as exc:
                log.debug("reading the addresses behind %s failed: %s", link.name, exc)
                cached = frozenset()
            view.peer_addresses[link.index] = cached
        return cached

    async def _dump_peer_addresses(self, link: Link) -> list[IPAddress]:
        # RTM_GETADDR with IFA_TARGET_NETNSID reads another namespace through its netnsid; the
        # kernel honours it on strict-checking sockets only (and pyroute2 mistypes the attribute).
        request = _TargetNetnsAddrRequest()
        request["family"] = socket.AF_UNSPEC
        request["attrs"] = [("IFA_TARGET_NETNSID", link.peer_netnsid)]
        options: dict[str, Any] = {"strict_check": True}
        if self._netns:
            options["netns"] = self._netns
        async with AsyncIPRoute(**options) as ipr:
            replies = await ipr.nlm_request(
                request, msg_type=RTM_GETADDR, msg_flags=NLM_F_REQUEST | NLM_F_DUMP
            )
            return [
                ipaddress.ip_address(msg.get("IFA_ADDRESS"))
                async for msg in replies
                if msg["index"] == link.peer_index and msg.get("IFA_ADDRESS")
            ]

    def mac_of(self, ifindex: int, view: HostView) -> str | None:
        """The MAC of the pod's end of the veth behind `ifindex` (lower case), read through the
        peer's netnsid (RTM_GETLINK with IFLA_TARGET_NETNSID); None when it cannot be read.

        What the pod's interface holds, so what the pod chose if it changed it before it was
        first located: the caller binds it once (it never follows a later change) and refuses a
        MAC another pod on the same bridge holds already."""
        link = view.links.get(ifindex)
        if link is None or link.peer_netnsid is None or link.peer_index is None:
            return None
        try:
            replies = self._ipr.link("get", index=link.peer_index, IFLA_IF_NETNSID=link.peer_netnsid)
        except (NetlinkError, OSError) as exc:
            log.debug("reading the MAC behind %s failed: %s", link.name, exc)
            return None
        for msg in replies:
            mac = msg.get("IFLA_ADDRESS")
            if mac:
                return str(mac).lower()
        return None

    def _maybe_probe(self, ip: IPAddress, bridge: int) -> None:
        """Ask the kernel to resolve a silent pod's MAC (NTF_USE: what sending a packet would do,
        without sending one from user space). The pod's reply fills the neighbour table and the
        bridge FDB, whose notifications wake the reconcile loop again. Rate-limited per IP."""
        if not self._active_probe:
            return
        now = self._clock()
        if now - self._last_probe.get(ip, -self._probe_interval_s) < self._probe_interval_s:
            return
        self._last_probe[ip] = now
        try:
            self._ipr.neigh("replace", dst=str(ip), ifindex=bridge, flags=NTF_USE, state=NUD_NONE)
        except NetlinkError as exc:  # a probe is best effort; discovery stays passive then
            log.debug("neighbour probe of %s failed: %s", ip, exc)


class _TargetNetnsAddrRequest(ifaddrmsg):
    """ifaddrmsg with IFA_TARGET_NETNSID as the kernel defines it (s32; pyroute2 says asciiz)."""

    nla_map = tuple(
        (name, "int32") if name == "IFA_TARGET_NETNSID" else (name, kind) for name, kind in ifaddrmsg.nla_map
    )
    # pyroute2 compiles nla_map once per class and the flag is inherited from ifaddrmsg; without
    # resetting it this subclass would silently reuse the parent's compiled (mistyped) table.
    _nlmsg_base__compiled_nla = False


def _route_hops(msg: Any) -> list[tuple[int, IPAddress | None]]:
    """(oif, gateway) of each next hop of a route message, multipath included."""
    gateway_raw = msg.get("RTA_GATEWAY")
    oif = msg.get("RTA_OIF")
    hops: list[tuple[int, IPAddress | None]] = []
    if oif is not None:
        hops.append((int(oif), ipaddress.ip_address(gateway_raw) if gateway_raw else None))
    for hop in msg.get("RTA_MULTIPATH") or ():
        hop_gateway = hop.get("RTA_GATEWAY")
        hops.append((int(hop["oif"]), ipaddress.ip_address(hop_gateway) if hop_gateway else None))
    return hops


def _ip_sort_key(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))
