"""The state check: what podfence put in the kernel stays there, or is put back.

Root in the node's namespace can remove any piece by hand, by mistake or by another tool's
cleanup: a pod interface's clsact qdisc or tc filter, a bpffs pin, an iptables chain's rules, an
ipset's members, a layer-2 chain. Nothing else would notice until the next policy change, which
may be long in a quiet cluster. StateGuard asks the dataplane to verify and repair
(`repair_state`, in agent/dataplane/*/verify.py) every `interval_s` and, for tc, as soon as the
kernel reports a qdisc or filter change (a netlink notification wakes the check, so a deleted
filter is back within milliseconds rather than seconds). The hooks in FORWARD/INPUT have their
own check (hookguard.py).

Every repair is counted per kind (podfence_state_repairs_total{kind}), logged with what was found
(as a warning: unlike a tool fighting for the top of FORWARD, removing podfence's state is not
routine), and kept for `podfence status` (the count and the last finding reach the control
service on the sync stream).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_TC

from agent.node.periodic import Periodic

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
KINDS = ("clsact", "tc_filter", "pin", "chain", "ipset", "bridge_chain")  # + "hook" (hookguard.py)
# tc notifications that may mean one of our filters or qdiscs went away (a new filter: replaced?)
_TC_EVENTS = frozenset({"RTM_DELQDISC", "RTM_DELTFILTER", "RTM_NEWTFILTER", "RTM_NEWQDISC"})


@runtime_checkable
class StateRepairing(Protocol):
    def repair_state(self) -> list[tuple[str, str]]:
        """Put back what was removed from podfence's kernel state; returns (kind, what was found)."""


class StateGuard:
    def __init__(self, dataplane: StateRepairing, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._dataplane = dataplane
        # a failed check (a busy xtables lock, an interface vanishing under us) is retried next round
        self._loop = Periodic("checking podfence's kernel state", interval_s, self._check)
        self.by_kind: Counter[str] = Counter()  # repairs since the agent started, per kind
        self.last = ""  # the last finding, for `podfence status`
        self.last_at = 0.0  # its wall-clock time
        self.checks = 0
        self._listeners: list[Callable[[], None]] = []

    @property
    def repairs(self) -> int:
        return sum(self.by_kind.values())

    def on_repair(self, listener: Callable[[], None]) -> None:
        """`listener()` after each check that repaired something (the sync client reports it)."""
        self._listeners.append(listener)

    def check_once(self) -> list[tuple[str, str]]:
        return self._loop.once() or []

    def _check(self) -> list[tuple[str, str]]:
        self.checks += 1
        found = self._dataplane.repair_state()
        if not found:
            return []
        for kind, what in found:
            self.by_kind[kind] += 1
            log.warning("podfence kernel state was removed or changed; repaired: %s", what,
                        extra={"kind": kind, "found": what})
        kind, what = found[-1]
        self.last, self.last_at = f"{kind}: {what}", time.time()
        for listener in self._listeners:
            listener()
        return found

    def wake(self) -> None:
        """Check now (a tc notification)."""
        self._loop.wake()

    def run(self, stop: threading.Event) -> None:
        """Checks every `interval_s` and whenever woken, until `stop` is set."""
        self._loop.run(stop)

    def watch_tc(self, stop: threading.Event, netns: str | None = None, poll_s: float = 0.2) -> None:
        """Wakes the check on tc qdisc and filter notifications in `netns`, until `stop` is set.
        podfence's own applies notify too: the check then finds everything in place."""
        ipr = IPRoute(netns=netns) if netns else IPRoute()
        try:
            ipr.bind(groups=RTMGRP_TC)
            while not stop.is_set():
                readable, _, _ = select.select([ipr], [], [], poll_s)
                if not readable:
                    continue
                try:
                    events = {str(msg.get("event", "")) for msg in ipr.get()}
                except (NetlinkError, OSError) as exc:  # ENOBUFS: notifications lost; a check covers them
                    log.debug("tc notifications lost (%s)", exc)
                    events = set(_TC_EVENTS)
                if events & _TC_EVENTS:
                    self.wake()
        finally:
            ipr.close()
