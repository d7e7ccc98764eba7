"""How recently the policy source heard from what it reads (the Kubernetes API server).

A control replica that loses the API server keeps serving the state it last read: agents keep
enforcing it and new agents still get it, which is safer than serving nothing. But that state
grows older with every minute, so the replica says so: `/healthz`, the
`podfence_control_source_last_heard_seconds` gauge and `podfence status` all read this tracker.

"Heard" means any answer: a list page, a watch being accepted, a watch event or bookmark, a watch
the server ended at its timeout. A quiet but healthy watch is silent until the server ends it, so
a source is *stale* only once it has heard nothing for longer than a healthy connection can stay
silent (`stale_after`), never merely because the cluster is quiet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Freshness:
    """One reading, as `podfence status` and `/healthz` show it."""

    source: str  # "kubernetes"
    seconds_since_heard: float  # since the least recently heard of the watched kinds
    stale: bool  # longer than `stale_after_seconds`: the served state may be out of date
    stale_after_seconds: float

    def describe(self) -> str:
        heard = f"last heard from the API server {self.seconds_since_heard:.1f} s ago"
        if self.stale:
            return (f"{self.source}: STALE, {heard} (more than {self.stale_after_seconds:.0f} s); "
                    "serving the state last read")
        return f"{self.source}: {heard}"


class FreshnessTracker:
    """Per-kind time of the last answer; a kind never heard counts from the tracker's creation."""

    def __init__(self, source: str, kinds: Iterable[str], stale_after_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._stale_after = stale_after_seconds
        self._clock = clock
        started = clock()
        self._heard = {kind: started for kind in kinds}
        self._lock = threading.Lock()

    def heard(self, kind: str) -> None:
        with self._lock:
            self._heard[kind] = self._clock()

    def read(self) -> Freshness:
        with self._lock:
            oldest = min(self._heard.values(), default=self._clock())
        age = max(0.0, self._clock() - oldest)
        return Freshness(self._source, age, age > self._stale_after, self._stale_after)
