"""The periodic count of what each pod holds of the bpf dataplane's conntrack map (issue 21, item
10). The datapath drops a pod's new flows once it has been charged for its bound of entries
(`--flows-per-pod`); an LRU map evicts without telling anyone, so only this count gives a pod
back the entries that expired, were evicted or were reset (`release_conntrack`,
agent/dataplane/bpf/ctbound.py; it walks the map only while some pod holds half its bound or
more). A pod at its bound waits at most one interval for what it lost.
The iptables dataplane needs none of it: connlimit asks the kernel's conntrack itself."""

from __future__ import annotations

import logging
import threading

from agent.dataplane.base import ConntrackReleasing
from agent.node.periodic import Periodic

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0


class ConntrackReleaser:
    def __init__(self, dataplane: ConntrackReleasing, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._dataplane = dataplane
        # a failed map read (a busy kernel, a map replaced under us) is retried next round
        self._loop = Periodic("counting the conntrack entries each pod holds", interval_s, self._release)

    def release_once(self) -> None:
        self._loop.once()

    def _release(self) -> None:
        deleted = self._dataplane.release_conntrack()
        if deleted:
            log.debug("deleted %d expired conntrack entries", deleted)

    def run(self, stop: threading.Event) -> None:
        """Counts every `interval_s` until `stop` is set."""
        self._loop.run(stop)
