"""What tells the agent to look at the host's interfaces again: `NetlinkMonitor` subscribes to
link, address, route, routing rule and neighbour (FDB included) notifications and wakes the
reconcile loop, so a new pod interface is guarded within milliseconds of appearing. The scan
itself is interfaces.py's.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

_MONITOR_GROUPS = (
    rtnl.RTMGRP_LINK
    | rtnl.RTMGRP_NEIGH  # also carries bridge FDB notifications (AF_BRIDGE)
    | rtnl.RTMGRP_IPV4_IFADDR
    | rtnl.RTMGRP_IPV6_IFADDR
    | rtnl.RTMGRP_IPV4_ROUTE
    | rtnl.RTMGRP_IPV6_ROUTE
    | rtnl.RTMGRP_IPV4_RULE  # rules decide whether the route table read by scan() is exact
    | rtnl.RTMGRP_IPV6_RULE
)


# What a notification is about, for the reconcile loop to decide how much to look at again.
LINK, ADDRESS, ROUTE, NEIGHBOUR = "link", "address", "route", "neighbour"
EVERYTHING = frozenset({LINK, ADDRESS, ROUTE, NEIGHBOUR})
_KIND_OF_EVENT = {"LINK": LINK, "ADDR": ADDRESS, "ROUTE": ROUTE, "RULE": ROUTE, "NEIGH": NEIGHBOUR}


def _kind_of(event: str) -> str:
    """RTM_NEWNEIGH -> "neighbour"; anything unexpected counts as a link change (look at all)."""
    suffix = event.removeprefix("RTM_").removeprefix("NEW").removeprefix("DEL")
    return _KIND_OF_EVENT.get(suffix, LINK)


class NetlinkMonitor:
    """Calls `on_change(kinds)` whenever links, addresses, routes, routing rules, neighbours or FDB
    entries change; `kinds` says which of LINK, ADDRESS, ROUTE (rules included), NEIGHBOUR (FDB
    entries included) changed.

    Notifications arriving together are coalesced: `on_change` only means "look again". The
    netlink socket is opened by `run`, on the thread that reads it (pyroute2's synchronous API
    keeps its sockets per thread); `run` calls `on_change(EVERYTHING)` once after subscribing,
    covering anything that happened before, and again whenever the kernel dropped notifications.
    """

    def __init__(self, on_change: Callable[[frozenset[str]], None], *, netns: str | None = None) -> None:
        self._on_change = on_change
        self._netns = netns
        self.subscribed = threading.Event()

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        """Blocks until `stop` is set."""
        ipr = IPRoute(netns=self._netns) if self._netns else IPRoute()
        try:
            ipr.bind(groups=_MONITOR_GROUPS)
            self.subscribed.set()
            self._on_change(EVERYTHING)
            while not stop.is_set():
                readable, _, _ = select.select([ipr], [], [], poll_s)
                if not readable:
                    continue
                try:
                    kinds = _drain(ipr)
                except (NetlinkError, OSError) as exc:
                    # ENOBUFS: the kernel dropped notifications; a full rescan covers what we missed.
                    log.warning("netlink monitor lost notifications (%s); rescanning", exc)
                    kinds = EVERYTHING
                if kinds:
                    self._on_change(kinds)
        finally:
            ipr.close()


_RT_TABLE_LOCAL = 255


def _can_change_a_scan(msg: Any) -> bool:
    """False for the two notifications no `scan()` or `resolve()` result depends on: IPv6
    link-local addresses (never a node address, never an uplink's subnet) and routes of the local
    table (scan reads the main one; a pod IP is never local). Each new interface brings a burst
    of both a second or two later, once IPv6 duplicate address detection ends."""
    event = str(msg.get("event", ""))
    if event in ("RTM_NEWADDR", "RTM_DELADDR") and msg.get("family") == socket.AF_INET6:
        raw = msg.get("IFA_ADDRESS")
        return not (raw and ipaddress.ip_address(raw).is_link_local)
    if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        return (msg.get("RTA_TABLE") or msg.get("table")) != _RT_TABLE_LOCAL
    return True


def _drain(ipr: IPRoute) -> frozenset[str]:
    kinds: set[str] = set()
    while True:
        kinds.update(_kind_of(str(msg.get("event", ""))) for msg in ipr.get() if _can_change_a_scan(msg))
        readable, _, _ = select.select([ipr], [], [], 0)
        if not readable:
            return frozenset(kinds)
