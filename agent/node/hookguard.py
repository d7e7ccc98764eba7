"""The periodic hook check: podfence's netfilter hooks must stay the first rules of their chains.

Both dataplanes judge pod traffic from rules that podfence puts at the top of the filter table's
FORWARD and INPUT (the iptables dispatch; the bpf dataplane's xt_bpf egress rule where it has no
netfilter links). Another tool that later inserts an ACCEPT above them lets pods escape policy
until the next apply, which may be long in a quiet cluster. (The bpf dataplane's netfilter links
cannot be outranked that way; the check only links again one that someone unpinned.)
HookGuard asks the dataplane every few seconds to check and repair (`repair_hooks`, one
filter-table read per family when all is well), counts the repairs for
podfence_hook_repairs_total and logs the first one as a warning (a tool that keeps fighting for
the top would otherwise fill the log; later repairs are in the metric and at debug level).
"""

from __future__ import annotations

import logging
import threading

from agent.dataplane.base import HookRepairing
from agent.node.periodic import Periodic

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0


class HookGuard:
    def __init__(self, dataplane: HookRepairing, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._dataplane = dataplane
        # a failed check (a busy xtables lock, a table changing under us) is retried next round
        self._loop = Periodic("checking podfence's netfilter hooks", interval_s, self._check)
        self.repairs = 0  # hooks put back since the agent started (podfence_hook_repairs_total)
        self._warned = False

    def check_once(self) -> list[str]:
        return self._loop.once() or []

    def _check(self) -> list[str]:
        repaired = self._dataplane.repair_hooks()
        if repaired:
            self.repairs += len(repaired)
            message = "podfence hooks were moved or removed (by another tool); restored: %s"
            if not self._warned:
                log.warning(message, ", ".join(repaired), extra={"repaired": repaired})
                self._warned = True
            else:
                log.debug(message, ", ".join(repaired), extra={"repaired": repaired})
        return repaired

    def run(self, stop: threading.Event) -> None:
        """Checks every `interval_s` until `stop` is set."""
        self._loop.run(stop)
