"""A latency histogram the agent keeps itself, so that the metrics collector (metrics.py) reads it
at scrape time: how long programming a policy version took (reconcile.py)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

# Programming a version takes milliseconds when all is well; the upper buckets exist to show
# retries (lock contention, vanished interfaces) rather than to resolve them finely.
DEFAULT_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Cumulative-bucket histogram kept here so the metrics collector reads it at scrape time."""

    def __init__(self, buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound (+Inf only)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)...] ending with +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running
