"""Stream balance between control replicas: shed the excess gradually, drain gradually on stop.

Agents connect to whichever replica answers, so after a rolling update of the control service
the first new replica can hold every stream. A replica that knows how many replicas there are
(`--replicas`) computes its share, `ceil(nodes / replicas * (1 + slack))` (nodes: those its
pod cache has pods on, each of which runs an agent; with none known it sheds nothing), and
while it holds more it ends one stream per interval with UNAVAILABLE ("rebalancing"); that
agent's next address is another replica. One at a time, so a replica never drops its excess at
once onto the others.

On shutdown the same care: `drain` first refuses new streams, then ends the open ones spread
evenly over the drain time instead of all at once, so the other replicas build their snapshots
for a trickle of agents, not a stampede.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable

from agent.control.hub import PolicyHub

log = logging.getLogger(__name__)

DEFAULT_SHED_INTERVAL_S = 1.0
DEFAULT_SLACK = 0.1
NODE_RECOUNT_TICKS = 30
REBALANCING = "rebalancing: this replica holds more than its share of streams"
SHUTTING_DOWN = "shutting down"


class StreamBalancer:
    """Ends one stream per `interval_s` while the hub holds more than its share."""

    def __init__(self, hub: PolicyHub, replicas: int, interval_s: float = DEFAULT_SHED_INTERVAL_S,
                 slack: float = DEFAULT_SLACK, rng: random.Random | None = None) -> None:
        self._hub = hub
        self._replicas = replicas
        self._interval = interval_s
        self._slack = slack
        self._rng = rng or random.Random()
        self.shed = 0
        # Counting the nodes walks every pod: done once per NODE_RECOUNT_TICKS, not every tick.
        self._nodes: int | None = None
        self._ticks = 0

    def share(self) -> int | None:
        """Streams this replica should hold at most; None when it knows of no node."""
        if self._nodes is None or self._ticks % NODE_RECOUNT_TICKS == 0:
            self._nodes = self._hub.node_count()
        nodes = self._nodes
        if not nodes:
            return None
        return max(1, math.ceil(nodes / self._replicas * (1 + self._slack)))

    def tick(self) -> str | None:
        """Sheds one stream if this replica holds more than its share; the node shed, or None."""
        if self._replicas <= 1 or self._hub.draining:
            return None
        self._ticks += 1
        streams = self._hub.open_streams()
        share = self.share()
        if share is None or len(streams) <= share:
            return None
        victim = self._rng.choice(streams)
        log.info("holding %d streams, share %d of %d replicas: moving node %s to another replica",
                 len(streams), share, self._replicas, victim.node)
        victim.close(REBALANCING)
        self.shed += 1
        return victim.node

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            self.tick()


def drain(hub: PolicyHub, seconds: float, sleep: Callable[[float], None] = time.sleep) -> int:
    """Refuses new streams, then ends the open ones evenly over `seconds`; returns how many."""
    hub.draining = True
    streams = hub.open_streams()
    if not streams:
        return 0
    gap = max(0.0, seconds) / len(streams)
    log.info("draining %d stream(s) over %.1f s", len(streams), seconds)
    for index, stream in enumerate(streams):
        if index:
            sleep(gap)
        stream.close(SHUTTING_DOWN)
    return len(streams)
