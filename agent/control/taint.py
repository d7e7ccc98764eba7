"""Lifts the not-ready taint from a node once its agent has applied its first policy version.

A node that joins the cluster carries `podfence.io/not-ready:NoSchedule` (set at registration:
the kubelet's `--register-with-taints`, or the node pool's taints), so no workload lands on it
while nothing enforces NetworkPolicy there. The agent tolerates the taint and starts; when it
acknowledges its first version on a stream, the hub calls `node_applied`, and this removes the
taint. The control service does it because it already talks to the API server; agents keep no
API access at all (a node's credentials can then never edit nodes).

The removal is a JSON patch that first tests the taint is still at the index just read, so a
concurrent edit of the node's taints makes it fail (409/422) and retry from a fresh read rather
than remove someone else's taint. Failures retry with capped, jittered backoff; a node that no
longer exists, or carries no such taint, is done.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.control.metrics import ControlMetrics

log = logging.getLogger(__name__)

NOT_READY_TAINT = "podfence.io/not-ready"
EFFECT = "NoSchedule"


class TaintRemover:
    """`node_applied(node)` is the hub's hook (never blocks); `run(stop)` does the API calls."""

    def __init__(
        self,
        api_client: Any,
        metrics: ControlMetrics,
        key: str = NOT_READY_TAINT,
        request_timeout_seconds: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._api_client = api_client
        self._metrics = metrics
        self.key = key
        self._timeout = request_timeout_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()

    def node_applied(self, node: str) -> None:
        self._queue.put(node)

    def run(self, stop: threading.Event) -> None:
        pending: dict[str, tuple[float, float]] = {}  # node -> (next attempt, its backoff)
        while not stop.is_set():
            now = self._clock()
            wait = min((at for at, _ in pending.values()), default=now + 1.0) - now
            try:
                node = self._queue.get(timeout=min(1.0, max(0.01, wait)))
                pending[node] = (0.0, self._backoff_initial)
            except queue.Empty:
                pass
            now = self._clock()
            for node, (at, delay) in list(pending.items()):
                if at > now or stop.is_set():
                    continue
                if self.remove(node):
                    del pending[node]
                else:
                    retry_at = now + random.uniform(delay / 2, delay)
                    pending[node] = (retry_at, min(self._backoff_max, delay * 2))

    def remove(self, node: str) -> bool:
        """One attempt: True when the node has no such taint any more (or is gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            raw = self._core.read_node(node, _request_timeout=self._timeout)
            data = self._api_client.sanitize_for_serialization(raw)
            taints = ((data.get("spec") or {}).get("taints") or []) if isinstance(data, dict) else []
            indices = [i for i, taint in enumerate(taints)
                       if taint.get("key") == self.key and taint.get("effect") == EFFECT]
            if not indices:
                return True
            patch: list[dict[str, Any]] = []
            for index in reversed(indices):  # from the end: earlier indices stay valid
                patch.append({"op": "test", "path": f"/spec/taints/{index}", "value": taints[index]})
                patch.append({"op": "remove", "path": f"/spec/taints/{index}"})
            self._core.patch_node(node, patch, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:
                log.info("node %s: gone before its %s taint was removed", node, self.key)
                return True
            log.warning("node %s: removing taint %s failed (%s %s); retrying", node, self.key,
                        exc.status, exc.reason)
            self._metrics.taint_removals_total.labels("failed").inc()
            return False
        except Exception as exc:  # connection errors, timeouts
            log.warning("node %s: removing taint %s failed (%s); retrying", node, self.key, exc)
            self._metrics.taint_removals_total.labels("failed").inc()
            return False
        self._metrics.taint_removals_total.labels("removed").inc()
        log.info("node %s: its agent applied a first version; taint %s:%s removed", node, self.key, EFFECT)
        return True
