"""One loop for the agent's periodic checks: the hook check (hookguard.py), the state check
(repair.py) and the conntrack count (ctrelease.py).

A task runs every `interval_s`, or at once when woken (repair.py: a tc notification), until the
agent stops. A DataplaneError is temporary by nature here (a busy xtables lock, an interface or a
map changing under the check): it is logged and the next round tries again. Any other exception
ends the loop and reaches the worker wrapper in main.py, which stops the agent: a check failing
on a bug is not left silently dead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.dataplane.base import DataplaneError

log = logging.getLogger(__name__)

T = TypeVar("T")
# The longest a stopping agent waits for a loop between rounds: one thread cannot wait on both
# `stop` and the wake event, so the wait is cut into slices this long (a few wake-ups a second).
STOP_SLICE_S = 0.2


class Periodic(Generic[T]):
    """`task` every `interval_s` seconds; `what` names it in the log ("checking the hooks")."""

    def __init__(self, what: str, interval_s: float, task: Callable[[], T]) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):  # 0 would spin, nan never wait
            raise ValueError(f"the interval of {what} must be a positive number of seconds, not {interval_s}")
        self.what = what
        self.interval_s = interval_s
        self._task = task
        self._wake = threading.Event()

    def once(self) -> T | None:
        """The task's result, or None when the dataplane failed (logged; the next round retries)."""
        try:
            return self._task()
        except DataplaneError as exc:
            log.warning("%s failed: %s", self.what, exc, extra={"task": self.what})
            return None

    def wake(self) -> None:
        """Run the task now rather than at the end of the interval."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Runs the task every `interval_s` and whenever woken, until `stop` is set."""
        while not stop.is_set():
            deadline = time.monotonic() + self.interval_s
            while not self._wake.is_set() and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(min(left, STOP_SLICE_S))
            if stop.is_set():
                return
            self._wake.clear()
            self.once()
